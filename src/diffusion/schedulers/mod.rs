//! Noise schedulers with diffusers' semantics.
//!
//! Each scheduler is built from a model's `scheduler/scheduler_config.json` the way diffusers'
//! `SchedulerClass.from_config(pipe.scheduler.config)` builds it: keys the class knows are taken from the
//! file, every other setting keeps that class's own default. The pipeline drives them by step index:
//! `timesteps()[i]` is what the UNet receives at step `i`, `scale_model_input(x, i)` prepares its input,
//! and `step(eps, i, x, noise)` returns the next sample.

use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use candle_core::{Result, Tensor};

mod config;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
mod schedule;
pub mod unipc;

pub use config::SchedulerConfig;

#[cfg(test)]
mod test_support;

/// Draws standard-normal noise for ancestral samplers (one draw per image, from that image's own generator).
pub trait NoiseSource {
    /// A tensor of N(0, 1) noise with the shape, dtype and device of `like`.
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// The schedulers that can be named on the command line and in job messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    UniPc,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::UniPc,
    ];

    /// The name used on the command line and on the bus.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
            SchedulerKind::UniPc => "unipc",
        }
    }

    /// The scheduler a pipeline folder names in `scheduler_config.json` / `model_index.json`
    /// (`_class_name`), when it is one of ours.
    pub fn from_class_name(class: &str) -> Option<SchedulerKind> {
        match class {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestral),
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmPp2m),
            "UniPCMultistepScheduler" => Some(SchedulerKind::UniPc),
            _ => None,
        }
    }
}

/// The scheduler a job that names none runs with, as the model's `scheduler_config.json` sets it up: one
/// of ours when it is the model's own class as configured (a DPM-Solver config's `use_karras_sigmas` picks
/// `dpmpp_2m_karras`), else `dpmpp_2m` standing in with a warning for the noise-prediction schedulers we do not
/// implement (PNDM, LMS, DDPM, Heun, DPM-Solver of another order or solver type), which sample the same
/// model differently. An error for a formulation no scheduler of ours can stand in for (EDM, flow
/// matching, consistency distillation): a job must name one knowingly.
pub fn model_default(config: &SchedulerConfig) -> std::result::Result<(SchedulerKind, Option<String>), String> {
    let class = config.class_name.as_deref().unwrap_or("(none)");
    let stand_in = |why: String| Ok((SchedulerKind::DpmPp2m, Some(format!("{why}; using dpmpp_2m"))));
    const OTHER_FORMULATIONS: [&str; 4] = ["EDM", "FlowMatch", "LCM", "TCD"];
    if OTHER_FORMULATIONS.iter().any(|prefix| class.starts_with(prefix)) {
        return Err(format!(
            "the model's scheduler {class} is not implemented, and none of ours samples its model as it does (its \
             images would be others entirely): name a scheduler to run it anyway"
        ));
    }
    match SchedulerKind::from_class_name(class) {
        Some(SchedulerKind::DpmPp2m) => {
            let order = config.solver_order.filter(|&o| o != 2);
            let solver = config.solver_type.as_deref().filter(|&t| t != "midpoint");
            if order.is_some() || solver.is_some() {
                return stand_in(format!(
                    "the model's {class} with solver_order {} and solver_type {} is not implemented",
                    order.unwrap_or(2),
                    solver.unwrap_or("midpoint")
                ));
            }
            let karras = config.use_karras_sigmas.unwrap_or(false);
            Ok((if karras { SchedulerKind::DpmPp2mKarras } else { SchedulerKind::DpmPp2m }, None))
        }
        Some(kind) => Ok((kind, None)),
        None => stand_in(format!("the model's scheduler {class:?} is not implemented")),
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        SchedulerKind::ALL.into_iter().find(|k| k.name() == lower).ok_or_else(|| {
            let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown scheduler '{s}' (expected one of: {})", names.join(", "))
        })
    }
}

/// How inference timesteps are spread over the training timesteps (diffusers' `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

impl TimestepSpacing {
    /// The name diffusers (and the CLI) use.
    pub fn name(self) -> &'static str {
        match self {
            TimestepSpacing::Leading => "leading",
            TimestepSpacing::Linspace => "linspace",
            TimestepSpacing::Trailing => "trailing",
        }
    }
}

impl FromStr for TimestepSpacing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "leading" => Ok(TimestepSpacing::Leading),
            "linspace" => Ok(TimestepSpacing::Linspace),
            "trailing" => Ok(TimestepSpacing::Trailing),
            _ => Err(format!("unknown timestep spacing '{s}' (expected leading, linspace or trailing)")),
        }
    }
}

/// What the UNet predicts (diffusers' `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// A configured noise scheduler, driven by step index (`0..timesteps().len()`, in run order).
///
/// Like diffusers, the multistep schedulers (DPM-Solver++, UniPC) keep the previous model outputs between
/// calls to `step` for consecutive indices; a call with any other index (a new run from 0, or an img2img run
/// starting at `k`) starts a fresh history. An img2img run that starts at index `k` calls
/// `add_noise(x, noise, k)` and then steps `k, k + 1, ...` (what diffusers does after `set_begin_index(k)`).
pub trait Scheduler: Send {
    /// Timesteps as the UNet receives them, in run order (DDIM/DPM/UniPC integers as f64, Euler floats).
    fn timesteps(&self) -> &[f64];
    /// Std of the initial noise (diffusers' init_noise_sigma): 1 unless the scheduler works in sigma space.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' scale_model_input for step index `step`: the identity unless the scheduler works in sigma
    /// space.
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One denoising step at step index `step`; returns prev_sample. Ancestral samplers draw from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// diffusers' add_noise(original, noise, timesteps()[step]) (used by img2img / inpainting).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor>;
    /// diffusers' `order` attribute (1 for all of these).
    fn order(&self) -> usize {
        1
    }
    /// What the scheduler carries from one step to the next (a multistep history), for a checkpoint;
    /// empty for the schedulers whose steps depend on their index only.
    fn state(&self) -> SchedulerState {
        SchedulerState::default()
    }
    /// Takes up a [`Self::state`] saved after step index `next_step - 1`, so the run continues at `next_step`
    /// exactly as if it had not stopped.
    fn restore(&mut self, _state: &SchedulerState) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A scheduler's state between steps: named tensors and counters.
#[derive(Clone, Debug, Default)]
pub struct SchedulerState {
    pub tensors: Vec<(String, Tensor)>,
    pub counters: Vec<(String, u64)>,
}

impl SchedulerState {
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Counter `name`, which a state of this scheduler always has.
    pub fn counter(&self, name: &str) -> anyhow::Result<usize> {
        let value = self.counters.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
        let value = value.with_context(|| format!("the scheduler state has no {name}"))?;
        usize::try_from(value).with_context(|| format!("the scheduler state's {name} is {value}"))
    }

    /// Counter `name`, refused outside `range` (a checkpoint written by another version, or damaged, must not
    /// index past a table when the run continues).
    pub fn counter_within(&self, name: &str, range: std::ops::RangeInclusive<usize>) -> anyhow::Result<usize> {
        let value = self.counter(name)?;
        anyhow::ensure!(
            range.contains(&value),
            "the scheduler state's {name} is {value}, not within {}..={}",
            range.start(),
            range.end()
        );
        Ok(value)
    }
}

/// diffusers' get_timesteps: img2img (a `strength`) runs the last int(steps · strength) steps, starting at
/// index `(steps - run) · order` of the timesteps, counted in steps even where the schedule has one timestep
/// more (trailing spacing for some step counts, such as 61, ends on an extra one).
pub fn first_step(steps: usize, strength: Option<f64>, scheduler: &dyn Scheduler) -> usize {
    match strength {
        None => 0,
        Some(strength) => {
            let run = ((steps as f64 * strength) as usize).min(steps);
            ((steps - run) * scheduler.order()).min(scheduler.timesteps().len())
        }
    }
}

/// A step count the schedule cannot take: the request's `steps` are at fault, not the model's config.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StepCountError(pub String);

/// Build `kind` the way `Class.from_config(config)` would in diffusers, for `num_inference_steps` steps;
/// `spacing` (from the CLI) overrides timestep_spacing when given.
///
/// `dpmpp_2m` is `DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
/// solver_type="midpoint", use_karras_sigmas=False)`; `dpmpp_2m_karras` the same with Karras sigmas.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    spacing: Option<TimestepSpacing>,
) -> anyhow::Result<Box<dyn Scheduler>> {
    let n = num_inference_steps;
    let scheduler: Box<dyn Scheduler> = match kind {
        SchedulerKind::Ddim => Box::new(ddim::DdimScheduler::new(config, n, spacing)?),
        SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(config, n, spacing)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestralScheduler::new(config, n, spacing)?),
        SchedulerKind::DpmPp2m => Box::new(dpm_solver::DpmSolverScheduler::new(config, n, spacing, false)?),
        SchedulerKind::DpmPp2mKarras => Box::new(dpm_solver::DpmSolverScheduler::new(config, n, spacing, true)?),
        SchedulerKind::UniPc => Box::new(unipc::UniPcScheduler::new(config, n, spacing)?),
    };
    Ok(scheduler)
}

#[cfg(test)]
mod tests {
    use super::test_support::{fake_model, NoNoise};
    use super::*;
    use candle_core::{DType, Device};
    use std::path::Path;

    fn cfg(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json).unwrap()
    }

    fn build_err(kind: SchedulerKind, json: &str, steps: usize) -> String {
        match build(kind, &cfg(json), steps, None) {
            Ok(_) => panic!("{kind} with {json} and {steps} steps should fail"),
            Err(e) => format!("{e:#}"),
        }
    }

    const SD15: &str = r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": false,
        "clip_sample": false, "timestep_spacing": "leading"}"#;

    #[test]
    fn scheduler_names_parse_and_reject_unknown() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(" Euler_A ".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
        let err = "dpm++".parse::<SchedulerKind>().unwrap_err();
        assert!(err.contains("unknown scheduler 'dpm++'"), "{err}");
        assert!(err.contains("dpmpp_2m_karras"), "{err}");
        let err = "sideways".parse::<TimestepSpacing>().unwrap_err();
        assert!(err.contains("sideways"), "{err}");
        assert_eq!(SchedulerKind::from_class_name("PNDMScheduler"), None);
    }

    #[test]
    fn a_models_own_scheduler_runs_as_configured_or_stands_in_or_is_refused() {
        let default = |json: &str| model_default(&cfg(json));
        let dpm = r#"{"_class_name": "DPMSolverMultistepScheduler""#;
        assert_eq!(default(&format!("{dpm}}}")), Ok((SchedulerKind::DpmPp2m, None)));
        let karras = default(&format!(r#"{dpm}, "use_karras_sigmas": true}}"#));
        assert_eq!(karras, Ok((SchedulerKind::DpmPp2mKarras, None)), "the model's Karras sigmas");
        for other in [r#""solver_order": 3"#, r#""solver_type": "heun""#] {
            let (kind, warning) = default(&format!("{dpm}, {other}}}")).unwrap();
            assert_eq!(kind, SchedulerKind::DpmPp2m);
            assert!(warning.is_some_and(|w| w.contains("is not implemented")), "{other}");
        }
        assert_eq!(default(r#"{"_class_name": "EulerDiscreteScheduler"}"#), Ok((SchedulerKind::Euler, None)));
        assert!(default(r#"{"_class_name": "PNDMScheduler"}"#).unwrap().1.is_some());
        for class in ["EDMDPMSolverMultistepScheduler", "EDMEulerScheduler", "LCMScheduler", "TCDScheduler"] {
            let err = default(&format!(r#"{{"_class_name": "{class}"}}"#)).unwrap_err();
            assert!(err.contains(class) && err.contains("name a scheduler"), "{err}");
        }
    }

    #[test]
    fn config_reads_python_json() {
        // diffusers writes -Infinity / NaN; strings keep their text; _use_default_values keys are dropped.
        let c = cfg(r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "variance_type": null, "algorithm_type": "dpmsolver++", "note": "NaN and -Infinity \" stay",
            "_use_default_values": ["steps_offset"], "steps_offset": 1, "unknown_key": [1, 2]}"#);
        assert_eq!(c.class_name.as_deref(), Some("DPMSolverMultistepScheduler"));
        assert_eq!(c.lambda_min_clipped, None);
        assert_eq!(c.steps_offset, None);
        assert_eq!(c.algorithm_type.as_deref(), Some("dpmsolver++"));
        assert_eq!(c.prediction().unwrap(), PredictionType::Epsilon);
        assert_eq!(cfg(r#"{"prediction_type": "v_prediction"}"#).prediction().unwrap(), PredictionType::VPrediction);
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers/reference.json");
        assert!(fixture.exists());
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = format!("{:#}", SchedulerConfig::from_json_str(r#"{"steps_offset": "one"}"#).unwrap_err());
        assert!(err.contains("steps_offset"), "{err}");
        let err = format!("{:#}", SchedulerConfig::from_json_str("[1, 2]").unwrap_err());
        assert!(err.contains("JSON object"), "{err}");
        let err = format!("{:#}", cfg(r#"{"prediction_type": "flow_prediction"}"#).prediction().unwrap_err());
        assert!(err.contains("prediction_type") && err.contains("flow_prediction"), "{err}");
    }

    #[test]
    fn from_file_names_the_file() {
        let missing = std::env::temp_dir().join("sd-rbee-no-such-dir/scheduler_config.json");
        let err = format!("{:#}", SchedulerConfig::from_file(&missing).unwrap_err());
        assert!(err.contains("sd-rbee-no-such-dir"), "{err}");
        let bad = std::env::temp_dir().join(format!("sd-rbee-bad-scheduler-{}.json", std::process::id()));
        std::fs::write(&bad, "{ not json").unwrap();
        let err = format!("{:#}", SchedulerConfig::from_file(&bad).unwrap_err());
        std::fs::remove_file(&bad).ok();
        assert!(err.contains(&bad.display().to_string()), "{err}");
    }

    #[test]
    fn unsupported_config_values_name_the_key() {
        use SchedulerKind::*;
        let cases: &[(SchedulerKind, &str, &str)] = &[
            (Ddim, r#"{"beta_schedule": "cubic"}"#, "beta_schedule"),
            (Euler, r#"{"beta_schedule": "cubic"}"#, "beta_schedule"),
            (Ddim, r#"{"prediction_type": "flow_prediction"}"#, "prediction_type"),
            (UniPc, r#"{"prediction_type": "x0"}"#, "prediction_type"),
            (EulerAncestral, r#"{"prediction_type": "sample"}"#, "prediction_type"),
            (Ddim, r#"{"timestep_spacing": "sideways"}"#, "timestep_spacing"),
            (Ddim, r#"{"thresholding": true}"#, "thresholding"),
            (DpmPp2m, r#"{"thresholding": true}"#, "thresholding"),
            (UniPc, r#"{"thresholding": true}"#, "thresholding"),
            (DpmPp2m, r#"{"algorithm_type": "sde-dpmsolver++"}"#, "algorithm_type"),
            (DpmPp2mKarras, r#"{"algorithm_type": "dpmsolver"}"#, "algorithm_type"),
            (DpmPp2m, r#"{"final_sigmas_type": "one"}"#, "final_sigmas_type"),
            (DpmPp2m, r#"{"use_lu_lambdas": true}"#, "use_lu_lambdas"),
            (DpmPp2m, r#"{"variance_type": "learned_range"}"#, "variance_type"),
            (Euler, r#"{"interpolation_type": "log_linear"}"#, "interpolation_type"),
            (Euler, r#"{"timestep_type": "fractional"}"#, "timestep_type"),
            (Euler, r#"{"use_exponential_sigmas": true}"#, "use_exponential_sigmas"),
            (UniPc, r#"{"solver_type": "rk4"}"#, "solver_type"),
            (UniPc, r#"{"solver_order": 7}"#, "solver_order"),
            (UniPc, r#"{"use_flow_sigmas": true}"#, "use_flow_sigmas"),
            (Ddim, r#"{"trained_betas": [0.1, 0.2]}"#, "trained_betas"),
            (Ddim, r#"{"num_train_timesteps": 1}"#, "num_train_timesteps"),
        ];
        for (kind, json, key) in cases {
            let err = build_err(*kind, json, 10);
            assert!(err.contains(key), "{kind} {json}: {err}");
            let err = build(*kind, &cfg(json), 10, None).err().unwrap();
            assert!(err.downcast_ref::<StepCountError>().is_none(), "the model's config, not the steps: {err:#}");
        }
        // Keys the class does not take are ignored, as in diffusers (Euler has no thresholding/clip_sample).
        build(Euler, &cfg(r#"{"thresholding": true, "clip_sample": true}"#), 10, None).unwrap();
        // "leading" + steps_offset 1 reaches timestep 1000 at 1000 DDIM steps (an IndexError in diffusers),
        // and "trailing" gives timestep -1 for some step counts.
        assert!(build_err(Ddim, SD15, 1000).contains("timestep 1000"));
        let err = build(Ddim, &cfg(SD15), 61, Some(TimestepSpacing::Trailing)).err().unwrap();
        assert!(err.downcast_ref::<StepCountError>().is_some(), "the step count is at fault: {err:#}");
        let err = format!("{err:#}");
        assert!(err.contains("timestep -1") && err.contains("trailing"), "{err}");
    }

    #[test]
    fn img2img_starts_where_diffusers_does_even_on_a_schedule_with_an_extra_timestep() {
        let config = SchedulerConfig::from_json_str(r#"{"beta_schedule": "scaled_linear"}"#).unwrap();
        let euler = |steps| build(SchedulerKind::Euler, &config, steps, Some(TimestepSpacing::Trailing));
        let (extra, plain) = (euler(61).unwrap(), euler(60).unwrap());
        assert_eq!((extra.timesteps().len(), plain.timesteps().len()), (62, 60), "as numpy's arange gives them");
        // Strength 1 runs every timestep, as diffusers' t_start = steps - int(steps * strength) = 0 does.
        assert_eq!(first_step(61, Some(1.0), extra.as_ref()), 0);
        assert_eq!(first_step(61, Some(0.5), extra.as_ref()), 31);
        assert_eq!(first_step(60, Some(0.5), plain.as_ref()), 30);
        assert_eq!(first_step(60, Some(1e-9), plain.as_ref()), 60, "nothing to run (refused before it runs)");
        assert_eq!(first_step(61, None, extra.as_ref()), 0);
    }

    #[test]
    fn step_counts_are_checked() {
        for kind in SchedulerKind::ALL {
            let err = build_err(kind, SD15, 0);
            assert!(err.contains("num_inference_steps"), "{kind}: {err}");
            for steps in [0, 1001] {
                let err = build(kind, &cfg(SD15), steps, None).err().unwrap();
                assert!(err.downcast_ref::<StepCountError>().is_some(), "{kind}: {err:#}");
            }
            let err = build_err(kind, SD15, 1001);
            assert!(err.contains("num_inference_steps") && err.contains("1000"), "{kind}: {err}");
            // DDIM's leading steps reach past the last timestep at 1000; DPM-Solver's and UniPC's (spread over
            // n + 1 points) repeat timesteps at 1000 (leading's ratio is 0, linspace rounds two to one).
            let multistep = matches!(kind, SchedulerKind::DpmPp2m | SchedulerKind::UniPc);
            let max = if kind == SchedulerKind::Ddim || multistep { 999 } else { 1000 };
            let s = build(kind, &cfg(SD15), max, None).unwrap();
            assert!(!s.timesteps().is_empty());
            // (Karras sigmas are distinct though their rounded timesteps may repeat, as in diffusers.)
            if kind != SchedulerKind::DpmPp2mKarras {
                assert!(s.timesteps().windows(2).all(|w| w[0] > w[1]), "{kind}: timesteps repeat");
            }
            if multistep {
                let err = build(kind, &cfg(SD15), 1000, None).err().expect("1000 leading steps repeat timesteps");
                assert!(err.downcast_ref::<StepCountError>().is_some(), "{kind}: {err:#}");
                let err = build(kind, &cfg(SD15), 1000, Some(TimestepSpacing::Linspace)).err().expect("repeats");
                assert!(err.to_string().contains("repeats timesteps"), "{kind}: {err:#}");
            }
        }
    }

    #[test]
    fn out_of_range_step_index_is_an_error() {
        let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        for kind in SchedulerKind::ALL {
            let mut s = build(kind, &cfg(SD15), 3, None).unwrap();
            let n = s.timesteps().len();
            assert!(s.add_noise(&x, &x, n).is_err(), "{kind}");
            assert!(s.step(&x, n, &x, &mut NoNoise).is_err(), "{kind}");
            if matches!(kind, SchedulerKind::Euler | SchedulerKind::EulerAncestral) {
                assert!(s.scale_model_input(&x, n).is_err(), "{kind}");
            }
        }
    }

    struct ConstNoise;
    impl NoiseSource for ConstNoise {
        fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
            like.ones_like()?.affine(0.5, 0.0)
        }
    }

    fn run(s: &mut dyn Scheduler, x_init: &Tensor) -> Tensor {
        let mut x = x_init.affine(s.init_noise_sigma(), 0.0).unwrap();
        let ts = s.timesteps().to_vec();
        for (i, t) in ts.into_iter().enumerate() {
            let scaled = s.scale_model_input(&x, i).unwrap();
            let m = fake_model(&scaled, t).unwrap();
            x = s.step(&m, i, &x, &mut ConstNoise).unwrap();
        }
        x
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The last step lands on sigma 0, where DPM/UniPC lambdas are +inf; every variant must stay finite,
    /// including the ones where diffusers produces NaN (UniPC bh1, predict_x0 = false, lower_order_final = false).
    #[test]
    fn final_step_to_sigma_zero_is_finite() {
        let x = Tensor::randn(0f32, 1., (1, 4, 3, 3), &Device::Cpu).unwrap();
        let extra = [
            "",
            r#", "use_karras_sigmas": true"#,
            r#", "solver_type": "bh1""#,
            r#", "predict_x0": false"#,
            r#", "lower_order_final": false"#,
            r#", "lower_order_final": false, "solver_order": 3, "solver_type": "bh1""#,
            r#", "euler_at_final": true, "prediction_type": "v_prediction""#,
        ];
        for kind in SchedulerKind::ALL {
            for more in extra {
                let json =
                    format!(r#"{{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012{more}}}"#);
                for steps in [1, 2, 3, 20] {
                    for spacing in [None, Some(TimestepSpacing::Trailing)] {
                        let mut s = build(kind, &cfg(&json), steps, spacing).unwrap();
                        let out = run(s.as_mut(), &x);
                        assert!(max_abs(&out).is_finite(), "{kind} {json} {steps} {spacing:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn half_precision_follows_f32() {
        let x = Tensor::randn(0f32, 1., (1, 4, 3, 3), &Device::Cpu).unwrap();
        for kind in SchedulerKind::ALL {
            let reference = run(build(kind, &cfg(SD15), 8, None).unwrap().as_mut(), &x);
            for dtype in [DType::F16, DType::BF16, DType::F64] {
                let mut s = build(kind, &cfg(SD15), 8, None).unwrap();
                let out = run(s.as_mut(), &x.to_dtype(dtype).unwrap());
                assert_eq!(out.dtype(), dtype, "{kind}");
                let noised = s.add_noise(&x.to_dtype(dtype).unwrap(), &x.to_dtype(dtype).unwrap(), 2).unwrap();
                assert_eq!(noised.dtype(), dtype, "{kind}");
                let err = max_abs(&(out.to_dtype(DType::F32).unwrap() - &reference).unwrap());
                let tol = if dtype == DType::F64 { 1e-4 } else { 0.1 } * max_abs(&reference).max(1.0);
                assert!(err <= tol, "{kind} {dtype:?}: {err} > {tol}");
            }
        }
    }

    #[test]
    fn a_scheduler_can_be_run_twice() {
        let x = Tensor::randn(0f32, 1., (1, 4, 3, 3), &Device::Cpu).unwrap();
        for kind in SchedulerKind::ALL {
            let mut s = build(kind, &cfg(SD15), 6, None).unwrap();
            let first = run(s.as_mut(), &x);
            let second = run(s.as_mut(), &x);
            let err = max_abs(&(first - second).unwrap());
            assert!(err == 0.0, "{kind}: {err}");
        }
    }

    /// img2img: add noise at step k, then step k.. on the same instance (a fresh history).
    #[test]
    fn img2img_start_in_the_middle() {
        let x = Tensor::randn(0f32, 1., (1, 4, 3, 3), &Device::Cpu).unwrap();
        for kind in SchedulerKind::ALL {
            let mut s = build(kind, &cfg(SD15), 10, None).unwrap();
            let ts = s.timesteps().to_vec();
            let mut latents = s.add_noise(&x, &x, 4).unwrap();
            for (i, &t) in ts.iter().enumerate().skip(4) {
                let scaled = s.scale_model_input(&latents, i).unwrap();
                let m = fake_model(&scaled, t).unwrap();
                latents = s.step(&m, i, &latents, &mut ConstNoise).unwrap();
            }
            assert!(max_abs(&latents).is_finite(), "{kind}");
        }
    }

    #[test]
    fn multistep_kinds_keep_order_one() {
        for kind in SchedulerKind::ALL {
            assert_eq!(build(kind, &cfg(SD15), 4, None).unwrap().order(), 1);
        }
    }
}
