//! Euler (`EulerDiscreteScheduler`, Karras et al. 2022 Algorithm 2 without churn) as diffusers 0.42 runs it:
//! float timesteps, sigmas linearly interpolated from the training schedule (or Karras sigmas with
//! `use_karras_sigmas`), a final sigma of zero (or `sigma_min`), inputs scaled by `1 / sqrt(sigma^2 + 1)`.

use anyhow::bail;
use candle_core::{Result, Tensor};

use super::schedule::{
    final_sigma, karras_sigmas, lin2, log_sigmas, np_arange, np_interp, np_linspace, np_round, reject_flag,
    sigma_min_of, sigma_to_t, train_sigmas, upcast, TrainSchedule,
};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};

/// Euler with diffusers' `EulerDiscreteScheduler` semantics (`s_churn = 0`, so deterministic).
#[derive(Clone, Debug)]
pub struct EulerScheduler {
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

/// What Euler and Euler ancestral share: timesteps, one sigma per timestep plus the final one, and the
/// sigma-space input scaling, initial noise and `add_noise` that follow from them.
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One more than the timesteps; the last is the final sigma.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
    /// The scheduler's name, for errors.
    pub name: &'static str,
}

impl SigmaSchedule {
    /// `(sigma, next sigma)` at step index `step`.
    pub fn sigma(&self, step: usize) -> Result<(f64, f64)> {
        if step + 1 >= self.sigmas.len() {
            candle_core::bail!("{}: step index {step} out of range ({} steps)", self.name, self.timesteps.len());
        }
        Ok((self.sigmas[step] as f64, self.sigmas[step + 1] as f64))
    }

    /// `sample / sqrt(sigma² + 1)`.
    pub fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma(step)?;
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)
    }

    /// `original + sigma · noise`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let (sigma, _) = self.sigma(step)?;
        let dtype = original.dtype();
        let x = upcast(original, dtype)?;
        let n = upcast(noise, dtype)?;
        lin2(&x, 1.0, &n, sigma)?.to_dtype(dtype)
    }
}

/// The float32 timesteps Euler and Euler ancestral both use for `timestep_spacing` (before any Karras
/// re-derivation).
pub(crate) fn euler_timesteps(sched: &TrainSchedule, n: usize) -> Vec<f32> {
    let big_n = sched.num_train_timesteps;
    match sched.spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (big_n - 1) as f64, n).into_iter().rev().map(|t| t as f32).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = big_n / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + sched.steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = big_n as f64 / n as f64;
            np_arange(big_n as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) as f32 - 1.0).collect()
        }
    }
}

/// `init_noise_sigma` of the Euler family: the largest sigma, or `sqrt(max^2 + 1)` for "leading" spacing.
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// Predicted x0 of the Euler family from the model output at noise level `sigma`.
pub(crate) fn euler_pred_x0(
    prediction: PredictionType,
    sample: &Tensor,
    model_output: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => lin2(sample, 1.0, model_output, -sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(model_output, -sigma / s2.sqrt(), sample, 1.0 / s2)
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

impl EulerScheduler {
    /// `EulerDiscreteScheduler.from_config(config)` followed by `set_timesteps(num_inference_steps)`.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        spacing: Option<TimestepSpacing>,
    ) -> anyhow::Result<Self> {
        let sched = TrainSchedule::from_config(config, TimestepSpacing::Linspace, spacing, num_inference_steps)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        match config.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => {
                bail!("scheduler config: interpolation_type = \"{other}\" is not supported (expected linear)")
            }
        }
        let continuous = match config.timestep_type.as_deref() {
            None | Some("discrete") => false,
            Some("continuous") => true,
            Some(other) => bail!(
                "scheduler config: timestep_type = \"{other}\" is not supported (expected discrete or continuous)"
            ),
        };
        let n = num_inference_steps;
        let ac = sched.alphas_cumprod_zero_snr_fixed();
        let train: Vec<f64> = train_sigmas(&ac).into_iter().map(|s| s as f64).collect();
        let mut timesteps: Vec<f64> = euler_timesteps(&sched, n).into_iter().map(|t| t as f64).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp(t, &train)).collect();
        if config.use_karras_sigmas.unwrap_or(false) {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_train = log_sigmas(&train_sigmas(&ac));
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_train)).collect();
        }
        let last = final_sigma(config.final_sigmas_type.as_deref(), sigma_min_of(&ac))?;
        let sigmas: Vec<f32> = sigmas.into_iter().chain(std::iter::once(last)).map(|s| s as f32).collect();
        let timesteps: Vec<f64> = if continuous && sched.prediction == PredictionType::VPrediction {
            sigmas[..sigmas.len() - 1].iter().map(|&s| (0.25 * s.ln()) as f64).collect()
        } else {
            timesteps.into_iter().map(|t| t as f32 as f64).collect()
        };
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, sched.spacing);
        Ok(EulerScheduler {
            schedule: SigmaSchedule { timesteps, sigmas, init_noise_sigma, name: "Euler" },
            prediction: sched.prediction,
        })
    }
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma, sigma_next) = self.schedule.sigma(step)?;
        let dtype = sample.dtype();
        let x = upcast(sample, dtype)?;
        let m = upcast(model_output, dtype)?;
        let pred_x0 = euler_pred_x0(self.prediction, &x, &m, sigma)?;
        // derivative = (x - x0) / sigma; x_next = x + derivative * (sigma_next - sigma)
        let derivative = (&x - &pred_x0)?.affine(1.0 / sigma, 0.0)?;
        let prev = (&x + derivative.affine(sigma_next - sigma, 0.0)?)?;
        prev.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::check_kind;
    use super::super::SchedulerKind;

    #[test]
    fn matches_diffusers_reference() {
        check_kind(SchedulerKind::Euler);
    }
}
