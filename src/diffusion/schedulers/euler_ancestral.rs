//! Euler ancestral (`EulerAncestralDiscreteScheduler`) as diffusers 0.42 runs it: the Euler sigmas and input
//! scaling, each step going down to `sigma_down` and adding fresh noise with std `sigma_up` (noise is drawn at
//! every step, the last one included, so the random stream matches diffusers').

use anyhow::bail;
use candle_core::{Result, Tensor};

use super::euler::{euler_init_noise_sigma, euler_pred_x0, euler_timesteps, SigmaSchedule};
use super::schedule::{np_interp, train_sigmas, upcast, TrainSchedule};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};

/// Euler ancestral with diffusers' `EulerAncestralDiscreteScheduler` semantics.
#[derive(Clone, Debug)]
pub struct EulerAncestralScheduler {
    /// The final sigma is 0.
    schedule: SigmaSchedule,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)` followed by `set_timesteps(num_inference_steps)`.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        spacing: Option<TimestepSpacing>,
    ) -> anyhow::Result<Self> {
        let sched = TrainSchedule::from_config(config, TimestepSpacing::Linspace, spacing, num_inference_steps)?;
        if sched.prediction == PredictionType::Sample {
            bail!(
                "scheduler config: prediction_type = \"sample\" is not supported by euler_a \
                 (diffusers does not implement it either)"
            );
        }
        let ac = sched.alphas_cumprod_zero_snr_fixed();
        let train: Vec<f64> = train_sigmas(&ac).into_iter().map(|s| s as f64).collect();
        let timesteps = euler_timesteps(&sched, num_inference_steps);
        let sigmas: Vec<f32> =
            timesteps.iter().map(|&t| np_interp(t as f64, &train) as f32).chain(std::iter::once(0.0)).collect();
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, sched.spacing);
        let timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        Ok(EulerAncestralScheduler {
            schedule: SigmaSchedule { timesteps, sigmas, init_noise_sigma, name: "Euler ancestral" },
            prediction: sched.prediction,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma_from, sigma_to) = self.schedule.sigma(step)?;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .max(0.0)
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();

        let dtype = sample.dtype();
        let x = upcast(sample, dtype)?;
        let m = upcast(model_output, dtype)?;
        let pred_x0 = euler_pred_x0(self.prediction, &x, &m, sigma_from)?;
        let derivative = (&x - &pred_x0)?.affine(1.0 / sigma_from, 0.0)?;
        let prev = (&x + derivative.affine(sigma_down - sigma_from, 0.0)?)?;
        // diffusers draws the noise with the model output's shape and dtype, at every step.
        let eps = upcast(&noise.randn_like(model_output)?, dtype)?;
        let prev = (prev + eps.affine(sigma_up, 0.0)?)?;
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
        check_kind(SchedulerKind::EulerAncestral);
    }
}
