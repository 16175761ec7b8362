//! DDIM (`DDIMScheduler`, Song et al. 2020) with eta = 0, as diffusers 0.42 runs it in the Stable Diffusion
//! pipelines: integer timesteps, `prev_timestep = t - num_train_timesteps // num_inference_steps`, optional
//! clipping of the predicted x0.

use anyhow::bail;
use candle_core::{Result, Tensor};

use super::schedule::{lin2, np_arange, np_linspace, np_round, spacing_name, upcast, TrainSchedule};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};

/// DDIM with diffusers' `DDIMScheduler` semantics (deterministic, eta = 0).
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    /// `num_train_timesteps // num_inference_steps`, the distance to the "previous" timestep.
    step_ratio: usize,
    prediction: PredictionType,
    clip_sample_range: Option<f64>,
}

impl DdimScheduler {
    /// `DDIMScheduler.from_config(config)` followed by `set_timesteps(num_inference_steps)`.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        spacing: Option<TimestepSpacing>,
    ) -> anyhow::Result<Self> {
        let sched = TrainSchedule::from_config(config, TimestepSpacing::Leading, spacing, num_inference_steps)?;
        if config.thresholding == Some(true) {
            bail!("scheduler config: thresholding = true is not supported");
        }
        let n = num_inference_steps;
        let big_n = sched.num_train_timesteps;
        let timesteps: Vec<i64> = match sched.spacing {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (big_n - 1) as f64, n).into_iter().rev().map(|t| np_round(t) as i64).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = big_n / n;
                (0..n).rev().map(|i| (i * ratio + sched.steps_offset) as i64).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = big_n as f64 / n as f64;
                np_arange(big_n as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) as i64 - 1).collect()
            }
        };
        if let Some(&bad) = timesteps.iter().find(|&&t| t < 0 || t as usize >= big_n) {
            // diffusers would index alphas_cumprod with it (wrapping around for -1, which "trailing" produces
            // for some step counts such as 61, or failing for 1000 with leading spacing and steps_offset 1).
            return Err(super::StepCountError(format!(
                "DDIM with timestep_spacing = \"{}\" and steps_offset = {} gives timestep {bad} for {n} steps, \
                 outside 0..num_train_timesteps ({big_n}); choose another step count",
                spacing_name(sched.spacing),
                sched.steps_offset
            ))
            .into());
        }
        let final_alpha_cumprod =
            if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { sched.alphas_cumprod[0] as f64 };
        let clip_sample_range =
            if config.clip_sample.unwrap_or(true) { Some(config.clip_sample_range.unwrap_or(1.0)) } else { None };
        Ok(DdimScheduler {
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            alphas_cumprod: sched.alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: big_n / n,
            prediction: sched.prediction,
            clip_sample_range,
        })
    }

    fn timestep(&self, step: usize) -> Result<usize> {
        match self.timesteps.get(step) {
            Some(&t) => Ok(t as usize),
            None => candle_core::bail!("DDIM: step index {step} out of range ({} steps)", self.timesteps.len()),
        }
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timestep(step)?;
        let prev_t = t as i64 - self.step_ratio as i64;
        // diffusers does this scalar arithmetic on float32 tensors; so do we, in the same order, so the
        // results agree to the last bit of the scalars.
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev =
            if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod as f32 };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sa, sb) = (alpha_prod_t.sqrt() as f64, beta_prod_t.sqrt() as f64);

        let dtype = sample.dtype();
        let x = upcast(sample, dtype)?;
        let m = upcast(model_output, dtype)?;
        let (mut pred_x0, pred_eps) = match self.prediction {
            // (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
            PredictionType::Epsilon => (((&x - (&m * sb)?)? / sa)?, m),
            PredictionType::Sample => {
                let eps = ((&x - (&m * sa)?)? / sb)?;
                (m, eps)
            }
            PredictionType::VPrediction => (((&x * sa)? - (&m * sb)?)?, ((&m * sa)? + (&x * sb)?)?),
        };
        if let Some(range) = self.clip_sample_range {
            pred_x0 = pred_x0.clamp(-range, range)?;
        }
        // eta = 0: no variance term. alpha_prod_t_prev ** 0.5 * x0 + (1 - alpha_prod_t_prev) ** 0.5 * eps
        let direction = (pred_eps * (1.0 - alpha_prod_t_prev).sqrt() as f64)?;
        let prev = ((pred_x0 * alpha_prod_t_prev.sqrt() as f64)? + direction)?;
        prev.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let t = self.timestep(step)?;
        let a = self.alphas_cumprod[t] as f64;
        let dtype = original.dtype();
        let x = upcast(original, dtype)?;
        let n = upcast(noise, dtype)?;
        lin2(&x, a.sqrt(), &n, (1.0 - a).sqrt())?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::check_kind;
    use super::super::SchedulerKind;

    #[test]
    fn matches_diffusers_reference() {
        check_kind(SchedulerKind::Ddim);
    }
}
