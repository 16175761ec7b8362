//! DPM-Solver++(2M) (`DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_order=2`,
//! `solver_type="midpoint"`), with or without Karras sigmas, as diffusers 0.42 runs it: data (x0) prediction,
//! a first-order warm-up step, second-order multistep updates, and a first-order final step when the
//! schedule ends at sigma 0 (`final_sigmas_type="zero"`) or `lower_order_final` applies.

use anyhow::bail;
use candle_core::{Result, Tensor};

use super::schedule::{
    final_sigma, karras_sigmas, lin2, log_sigmas, np_arange, np_interp, np_linspace, np_round, reject_flag,
    sigma_min_of, sigma_to_t, train_sigmas, upcast, TrainSchedule,
};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerState, TimestepSpacing};

/// DPM-Solver++(2M) with diffusers' `DPMSolverMultistepScheduler` semantics.
#[derive(Clone, Debug)]
pub struct DpmSolverScheduler {
    timesteps: Vec<f64>,
    /// One more than the timesteps; the last is the final sigma.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// Converted (x0) model outputs of the previous and the current step.
    model_outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
    /// The step index the multistep history continues with; any other index starts a fresh history.
    next_step: usize,
}

/// `(alpha_t, sigma_t)` of the variance-preserving process at Karras noise level `sigma`.
pub(crate) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)`; +inf at sigma 0.
pub(crate) fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

/// The integer timesteps DPM-Solver and UniPC derive from `timestep_spacing` (spread over `n + 1` points
/// for linspace/leading and the last one dropped). `last_timestep` is `num_train_timesteps` unless DPM's
/// `lambda_min_clipped` cuts it. Step counts near the training steps' give repeated timesteps (leading's
/// integer ratio reaches 0, the others round two points to one): a zero step, whose solver update divides by
/// zero (diffusers' too, which answers NaN images), so they are refused as a step count.
pub(crate) fn multistep_timesteps(
    sched: &TrainSchedule,
    n: usize,
    last_timestep: usize,
) -> std::result::Result<Vec<f64>, super::StepCountError> {
    let timesteps: Vec<f64> = match sched.spacing {
        TimestepSpacing::Linspace => {
            let mut t: Vec<f64> =
                np_linspace(0.0, last_timestep as f64 - 1.0, n + 1).into_iter().map(np_round).collect();
            t.reverse();
            t.pop();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * ratio + sched.steps_offset) as f64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = sched.num_train_timesteps as f64 / n as f64;
            np_arange(last_timestep as f64, 0.0, -ratio).into_iter().map(|t| np_round(t) - 1.0).collect()
        }
    };
    if timesteps.windows(2).any(|w| w[0] <= w[1]) {
        return Err(super::StepCountError(format!(
            "num_inference_steps = {n} with {} timestep spacing repeats timesteps (of {last_timestep}); \
             use fewer steps",
            sched.spacing.name()
        )));
    }
    Ok(timesteps)
}

/// x0 from the model output, as `convert_model_output` computes it for the data-prediction solvers.
pub(crate) fn x0_from_model_output(
    prediction: PredictionType,
    sample: &Tensor,
    model_output: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    match prediction {
        PredictionType::Epsilon => lin2(sample, 1.0 / alpha_t, model_output, -sigma_t / alpha_t),
        PredictionType::Sample => Ok(model_output.clone()),
        PredictionType::VPrediction => lin2(sample, alpha_t, model_output, -sigma_t),
    }
}

impl DpmSolverScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
    /// solver_type="midpoint", use_karras_sigmas=karras)` followed by `set_timesteps(num_inference_steps)`.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        spacing: Option<TimestepSpacing>,
        karras: bool,
    ) -> anyhow::Result<Self> {
        let sched = TrainSchedule::from_config(config, TimestepSpacing::Linspace, spacing, num_inference_steps)?;
        if let Some(alg) = config.algorithm_type.as_deref() {
            if alg != "dpmsolver++" {
                bail!(
                    "scheduler config: algorithm_type = \"{alg}\" is not supported \
                     (dpmpp_2m needs dpmsolver++)"
                );
            }
        }
        reject_flag("thresholding", config.thresholding)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        reject_flag("use_lu_lambdas", config.use_lu_lambdas)?;
        reject_flag("use_flow_sigmas", config.use_flow_sigmas)?;
        if let Some(v) = config.variance_type.as_deref() {
            bail!("scheduler config: variance_type = \"{v}\" is not supported");
        }
        let n = num_inference_steps;
        let ac = sched.alphas_cumprod_zero_snr_fixed();
        let big_n = sched.num_train_timesteps;

        // lambda_min_clipped: drop the tail of the schedule whose lambda(t) is below the bound.
        let last_timestep = match config.lambda_min_clipped {
            Some(min) if min.is_finite() => {
                let clipped = ac
                    .iter()
                    .rev()
                    .filter(|&&a| {
                        let l = (a.sqrt().ln() - (1.0 - a).sqrt().ln()) as f64;
                        l < min
                    })
                    .count();
                big_n - clipped
            }
            _ => big_n,
        };
        if last_timestep == 0 {
            bail!("scheduler config: lambda_min_clipped = {:?} clips every timestep", config.lambda_min_clipped);
        }

        let train_f32 = train_sigmas(&ac);
        let train: Vec<f64> = train_f32.iter().map(|&s| s as f64).collect();
        // Karras sigmas set their own timesteps.
        let mut timesteps = if karras { Vec::new() } else { multistep_timesteps(&sched, n, last_timestep)? };
        let sigmas: Vec<f64> = if karras {
            let sigma_min = config.sigma_min.unwrap_or(train[0]);
            let sigma_max = config.sigma_max.unwrap_or(train[big_n - 1]);
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_train = log_sigmas(&train_f32);
            let round = sched.beta_schedule != "squaredcos_cap_v2";
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_train);
                    // torch's int64 cast truncates the unrounded cosine-schedule timesteps.
                    if round {
                        np_round(t)
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| np_interp(t, &train)).collect()
        };
        let last = final_sigma(config.final_sigmas_type.as_deref(), sigma_min_of(&ac))?;
        let sigmas: Vec<f32> = sigmas.into_iter().chain(std::iter::once(last)).map(|s| s as f32).collect();
        Ok(DpmSolverScheduler {
            timesteps,
            sigmas,
            prediction: sched.prediction,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero: last == 0.0,
            model_outputs: [None, None],
            lower_order_nums: 0,
            next_step: 0,
        })
    }
}

impl Scheduler for DpmSolverScheduler {
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
        let len = self.timesteps.len();
        if step >= len {
            candle_core::bail!("DPM-Solver++: step index {step} out of range ({len} steps)");
        }
        if step != self.next_step {
            // Not the continuation of the previous call (a new run, or img2img starting later): diffusers
            // would start a fresh scheduler here.
            self.model_outputs = [None, None];
            self.lower_order_nums = 0;
        }
        self.next_step = step + 1;
        let sigma_s0 = self.sigmas[step] as f64;
        let sigma_next = self.sigmas[step + 1] as f64;
        let lower_order_final =
            step == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_sigma_zero);

        let dtype = sample.dtype();
        let x = upcast(sample, dtype)?;
        let m = upcast(model_output, dtype)?;
        let x0 = x0_from_model_output(self.prediction, &x, &m, sigma_s0)?;
        self.model_outputs.swap(0, 1);
        self.model_outputs[1] = Some(x0.clone());

        let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
        let (alpha_s0, sigma_s0v) = alpha_sigma(sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0v);
        // exp(-h) - 1; exactly -1 when the next sigma is 0 (h = +inf).
        let phi = (-h).exp_m1();
        let sample_coef = sigma_t / sigma_s0v;

        let prev_x0 = match &self.model_outputs[0] {
            // A second-order step needs a previous output and a finite h (sigma_next > 0).
            Some(prev) if self.lower_order_nums >= 1 && step >= 1 && !lower_order_final && sigma_next > 0.0 => {
                Some(prev.clone())
            }
            _ => None,
        };
        let prev = match prev_x0 {
            None => lin2(&x, sample_coef, &x0, -alpha_t * phi)?,
            Some(m1) => {
                let sigma_s1 = self.sigmas[step - 1] as f64;
                let (alpha_s1, sigma_s1v) = alpha_sigma(sigma_s1);
                let h_0 = lambda(alpha_s0, sigma_s0v) - lambda(alpha_s1, sigma_s1v);
                let r0 = h_0 / h;
                // D0 = m0, D1 = (m0 - m1) / r0; x_t = c*x - a*phi*D0 - 0.5*a*phi*D1
                let d1 = (&x0 - &m1)?.affine(1.0 / r0, 0.0)?;
                let base = lin2(&x, sample_coef, &x0, -alpha_t * phi)?;
                (base + d1.affine(-0.5 * alpha_t * phi, 0.0)?)?
            }
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        prev.to_dtype(dtype)
    }

    fn state(&self) -> SchedulerState {
        let tensors = (self.model_outputs.iter().enumerate())
            .filter_map(|(i, m)| m.as_ref().map(|t| (format!("model_outputs.{i}"), t.clone())))
            .collect();
        let counters = vec![
            ("lower_order_nums".into(), self.lower_order_nums as u64),
            ("next_step".into(), self.next_step as u64),
        ];
        SchedulerState { tensors, counters }
    }

    fn restore(&mut self, state: &SchedulerState) -> anyhow::Result<()> {
        self.model_outputs = [0, 1].map(|i| state.tensor(&format!("model_outputs.{i}")).cloned());
        self.lower_order_nums = state.counter_within("lower_order_nums", 0..=2)?;
        self.next_step = state.counter_within("next_step", 0..=self.timesteps.len())?;
        Ok(())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let Some(&sigma) = self.sigmas.get(step).filter(|_| step < self.timesteps.len()) else {
            candle_core::bail!("DPM-Solver++: step index {step} out of range ({} steps)", self.timesteps.len());
        };
        let (alpha_t, sigma_t) = alpha_sigma(sigma as f64);
        let dtype = original.dtype();
        let x = upcast(original, dtype)?;
        let n = upcast(noise, dtype)?;
        lin2(&x, alpha_t, &n, sigma_t)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::check_kind;
    use super::super::SchedulerKind;

    #[test]
    fn matches_diffusers_reference() {
        check_kind(SchedulerKind::DpmPp2m);
    }

    #[test]
    fn karras_matches_diffusers_reference() {
        check_kind(SchedulerKind::DpmPp2mKarras);
    }
}
