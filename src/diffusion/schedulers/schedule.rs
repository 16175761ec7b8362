//! Shared pieces of the schedulers: the training noise schedule (betas, `alphas_cumprod`, sigmas), timestep
//! spacing, Karras sigmas and the sigma → timestep interpolation, written to reproduce diffusers' arithmetic
//! (betas and `alphas_cumprod` as torch float32, spacing and sigma interpolation in numpy float64), plus the
//! config resolution and dtype helpers every scheduler uses.

use anyhow::bail;
use candle_core::{DType, Tensor};

use super::{PredictionType, SchedulerConfig, TimestepSpacing};

/// The parts of a scheduler config every class shares, resolved against that class's defaults.
#[derive(Clone, Debug)]
pub(crate) struct TrainSchedule {
    pub num_train_timesteps: usize,
    /// `alphas_cumprod` exactly as diffusers holds it (float32), before any class-specific fix-ups.
    pub alphas_cumprod: Vec<f32>,
    pub beta_schedule: String,
    pub rescale_betas_zero_snr: bool,
    pub prediction: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl TrainSchedule {
    /// Resolves the shared keys. `default_spacing` is the class's own `timestep_spacing` default and
    /// `spacing_override` the command-line choice, which wins over both.
    pub fn from_config(
        config: &SchedulerConfig,
        default_spacing: TimestepSpacing,
        spacing_override: Option<TimestepSpacing>,
        num_inference_steps: usize,
    ) -> anyhow::Result<Self> {
        let num_train_timesteps = config.num_train_timesteps.unwrap_or(1000);
        if num_train_timesteps < 2 {
            bail!("scheduler config: num_train_timesteps = {num_train_timesteps} is too small (need at least 2)");
        }
        if num_inference_steps == 0 {
            return Err(super::StepCountError("num_inference_steps must be at least 1 (got 0)".into()).into());
        }
        if num_inference_steps > num_train_timesteps {
            return Err(super::StepCountError(format!(
                "num_inference_steps = {num_inference_steps} cannot be larger than the scheduler config's \
                 num_train_timesteps = {num_train_timesteps}"
            ))
            .into());
        }
        let beta_start = config.beta_start.unwrap_or(0.0001);
        let beta_end = config.beta_end.unwrap_or(0.02);
        let beta_schedule = config.beta_schedule.clone().unwrap_or_else(|| "linear".to_string());
        let mut betas = match &config.trained_betas {
            Some(trained) => {
                if trained.len() != num_train_timesteps {
                    bail!(
                        "scheduler config: trained_betas has {} values but \
                         num_train_timesteps = {num_train_timesteps}",
                        trained.len()
                    );
                }
                trained.iter().map(|&b| b as f32).collect()
            }
            None => match beta_schedule.as_str() {
                "linear" => torch_linspace_f32(beta_start, beta_end, num_train_timesteps),
                "scaled_linear" => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => betas_for_alpha_bar(num_train_timesteps),
                other => bail!(
                    "scheduler config: beta_schedule = \"{other}\" is not supported \
                     (expected linear, scaled_linear or squaredcos_cap_v2)"
                ),
            },
        };
        let rescale_betas_zero_snr = config.rescale_betas_zero_snr.unwrap_or(false);
        if rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod(&alphas);
        if alphas_cumprod.iter().any(|a| !a.is_finite() || *a < 0.0) {
            bail!(
                "scheduler config: the beta schedule gives invalid alphas_cumprod \
                 (check beta_start, beta_end and trained_betas)"
            );
        }
        let spacing = match spacing_override {
            Some(s) => s,
            None => match &config.timestep_spacing {
                Some(s) => s
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("scheduler config: timestep_spacing = \"{s}\": {e}"))?,
                None => default_spacing,
            },
        };
        Ok(TrainSchedule {
            num_train_timesteps,
            alphas_cumprod,
            beta_schedule,
            rescale_betas_zero_snr,
            prediction: config.prediction()?,
            spacing,
            steps_offset: config.steps_offset.unwrap_or(0),
        })
    }

    /// The Euler/DPM/UniPC classes pin the last `alphas_cumprod` to 2^-24 after a zero-SNR rescale so that the
    /// largest sigma stays finite (DDIM does not).
    pub fn alphas_cumprod_zero_snr_fixed(&self) -> Vec<f32> {
        let mut ac = self.alphas_cumprod.clone();
        if self.rescale_betas_zero_snr {
            if let Some(last) = ac.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        ac
    }
}

/// The config spelling of a spacing.
pub(crate) fn spacing_name(spacing: TimestepSpacing) -> &'static str {
    match spacing {
        TimestepSpacing::Leading => "leading",
        TimestepSpacing::Linspace => "linspace",
        TimestepSpacing::Trailing => "trailing",
    }
}

/// Fails with a message naming `key` when a boolean option we do not implement is switched on.
pub(crate) fn reject_flag(key: &str, value: Option<bool>) -> anyhow::Result<()> {
    if value == Some(true) {
        bail!("scheduler config: {key} = true is not supported");
    }
    Ok(())
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as the CPU kernel computes it: the two halves are
/// filled from either end with a fused multiply-add in float32.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    match steps {
        0 => vec![],
        1 => vec![start as f32],
        _ => {
            let (start, end) = (start as f32, end as f32);
            let step = (end - start) / (steps - 1) as f32;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((steps - i - 1) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// diffusers' `betas_for_alpha_bar` with the cosine ("squaredcos_cap_v2") transform, computed in f64 and stored
/// as float32.
pub(crate) fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` over float32 (the CPU kernel accumulates in double and stores float32).
pub(crate) fn cumprod(alphas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    alphas
        .iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (Algorithm 1 of arXiv:2305.08891) in float32.
pub(crate) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ac: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let scale = first / (first - last);
    for v in sqrt_ac.iter_mut() {
        *v = (*v - last) * scale;
    }
    let ac: Vec<f32> = sqrt_ac.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ac.len());
    out.push(1.0 - ac[0]);
    for i in 1..ac.len() {
        out.push(1.0 - ac[i] / ac[i - 1]);
    }
    out
}

/// The training sigmas `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` as float32, in timestep order.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.log` of the float32 training sigmas.
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

/// `np.linspace(start, stop, num)` in float64 (`y = i * step + start`, last element exactly `stop`).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            y[num - 1] = stop;
            y
        }
    }
}

/// `np.arange(start, stop, step)` for float arguments: `ceil((stop - start) / step)` values
/// `start + i * delta`, with `delta = (start + step) - start` as numpy's fill computes it.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // NaN and non-positive lengths give an empty range.
    let len = if len >= 1.0 { len as usize } else { 0 };
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy's `round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)`.
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`, by linear
/// interpolation in `log_sigmas` (ascending with t).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // np.cumsum(dists >= 0).argmax(): the first index where the running count reaches its maximum.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = i;
        }
    }
    let low_idx = best_idx.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[high_idx] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) sigmas with rho = 7, from `sigma_max` down to `sigma_min` (f64, as numpy computes them).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// `((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5` (the `final_sigmas_type = "sigma_min"` last sigma).
pub(crate) fn sigma_min_of(alphas_cumprod: &[f32]) -> f64 {
    let a = alphas_cumprod[0];
    ((1.0 - a) / a).sqrt() as f64
}

/// The final sigma a `final_sigmas_type` value asks for (`sigma_min` is the class-specific smallest sigma).
pub(crate) fn final_sigma(final_sigmas_type: Option<&str>, sigma_min: f64) -> anyhow::Result<f64> {
    match final_sigmas_type.unwrap_or("zero") {
        "zero" => Ok(0.0),
        "sigma_min" => Ok(sigma_min),
        other => bail!(
            "scheduler config: final_sigmas_type = \"{other}\" is not supported \
             (expected zero or sigma_min)"
        ),
    }
}

/// The dtype the step arithmetic runs in: float32 for half types (diffusers upcasts), otherwise the sample's.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// `t` in the compute dtype for `like`.
pub(crate) fn upcast(t: &Tensor, like: DType) -> candle_core::Result<Tensor> {
    t.to_dtype(compute_dtype(like))
}

/// `a * x + b * y` with scalar coefficients.
pub(crate) fn lin2(x: &Tensor, a: f64, y: &Tensor, b: f64) -> candle_core::Result<Tensor> {
    x.affine(a, 0.0)? + y.affine(b, 0.0)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_arange(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_round(3.5), 4.0);
        assert_eq!(np_interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
        let ls = log_sigmas(&[0.1, 0.2, 0.4, 0.8]);
        assert!((sigma_to_t(0.2, &ls) - 1.0).abs() < 1e-6);
        assert!((sigma_to_t(0.8, &ls) - 3.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.0, &ls), 0.0);
    }
}
