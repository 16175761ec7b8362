//! UniPC (`UniPCMultistepScheduler`, Zhao et al. 2023) as diffusers 0.42 runs it: a UniP predictor of order
//! `solver_order` (default 2, warmed up from order 1, lowered towards the end with `lower_order_final`) and a
//! UniC corrector applied to each new sample with the fresh model output, `bh1`/`bh2` variants, x0 or noise
//! prediction (`predict_x0`).

use anyhow::bail;
use candle_core::{Result, Tensor};

use super::dpm_solver::{alpha_sigma, lambda, multistep_timesteps, x0_from_model_output};
use super::schedule::{
    final_sigma, karras_sigmas, lin2, log_sigmas, np_interp, np_round, reject_flag, sigma_min_of, sigma_to_t,
    train_sigmas, upcast, TrainSchedule,
};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerState, TimestepSpacing};

/// UniPC's `B(h)` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolverType {
    Bh1,
    Bh2,
}

/// UniPC with diffusers' `UniPCMultistepScheduler` semantics.
#[derive(Clone, Debug)]
pub struct UniPcScheduler {
    timesteps: Vec<f64>,
    /// One more than the timesteps; the last is the final sigma.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    solver_order: usize,
    solver_type: SolverType,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// Converted model outputs, oldest first (`solver_order` slots).
    model_outputs: Vec<Option<Tensor>>,
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
    /// The step index the multistep history continues with; any other index starts a fresh history.
    next_step: usize,
}

impl UniPcScheduler {
    /// `UniPCMultistepScheduler.from_config(config)` followed by `set_timesteps(num_inference_steps)`.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
        spacing: Option<TimestepSpacing>,
    ) -> anyhow::Result<Self> {
        let sched = TrainSchedule::from_config(config, TimestepSpacing::Linspace, spacing, num_inference_steps)?;
        reject_flag("thresholding", config.thresholding)?;
        reject_flag("use_exponential_sigmas", config.use_exponential_sigmas)?;
        reject_flag("use_beta_sigmas", config.use_beta_sigmas)?;
        reject_flag("use_flow_sigmas", config.use_flow_sigmas)?;
        reject_flag("use_dynamic_shifting", config.use_dynamic_shifting)?;
        if let Some(v) = config.shift_terminal {
            bail!("scheduler config: shift_terminal = {v} is not supported (it needs flow sigmas)");
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            bail!("scheduler config: solver_order = {solver_order} is not supported (expected 1, 2 or 3)");
        }
        let solver_type = match config.solver_type.as_deref() {
            None | Some("bh2") => SolverType::Bh2,
            Some("bh1") => SolverType::Bh1,
            // diffusers maps the DPM-Solver names to bh2.
            Some("midpoint") | Some("heun") | Some("logrho") => SolverType::Bh2,
            Some(other) => {
                bail!("scheduler config: solver_type = \"{other}\" is not supported (expected bh1 or bh2)")
            }
        };
        let n = num_inference_steps;
        let ac = sched.alphas_cumprod_zero_snr_fixed();
        let big_n = sched.num_train_timesteps;
        let train_f32 = train_sigmas(&ac);
        let train: Vec<f64> = train_f32.iter().map(|&s| s as f64).collect();
        let karras = config.use_karras_sigmas.unwrap_or(false);
        // Karras sigmas set their own timesteps.
        let mut timesteps = if karras { Vec::new() } else { multistep_timesteps(&sched, n, big_n)? };
        let final_type = config.final_sigmas_type.as_deref();
        let (sigmas, last) = if karras {
            let sigma_min = config.sigma_min.unwrap_or(train[0]);
            let sigma_max = config.sigma_max.unwrap_or(train[big_n - 1]);
            let sigmas = karras_sigmas(sigma_min, sigma_max, n);
            let log_train = log_sigmas(&train_f32);
            timesteps = sigmas.iter().map(|&s| np_round(sigma_to_t(s, &log_train))).collect();
            // UniPC's Karras "sigma_min" final sigma is the last Karras sigma.
            let last = final_sigma(final_type, sigmas[sigmas.len() - 1])?;
            (sigmas, last)
        } else {
            let sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp(t, &train)).collect();
            (sigmas, final_sigma(final_type, sigma_min_of(&ac))?)
        };
        let sigmas: Vec<f32> = sigmas.into_iter().chain(std::iter::once(last)).map(|s| s as f32).collect();
        Ok(UniPcScheduler {
            timesteps,
            sigmas,
            prediction: sched.prediction,
            solver_order,
            solver_type,
            predict_x0: config.predict_x0.unwrap_or(true),
            lower_order_final: config.lower_order_final.unwrap_or(true),
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            model_outputs: vec![None; solver_order],
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    fn lambda_at(&self, i: usize) -> (f64, f64, f64) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[i] as f64);
        (alpha, sigma, lambda(alpha, sigma))
    }

    /// `convert_model_output`: x0 (`predict_x0`) or the noise.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step] as f64;
        if self.predict_x0 {
            return x0_from_model_output(self.prediction, sample, model_output, sigma);
        }
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.prediction {
            PredictionType::Epsilon => Ok(model_output.clone()),
            PredictionType::Sample => lin2(sample, 1.0 / sigma_t, model_output, -alpha_t / sigma_t),
            PredictionType::VPrediction => lin2(model_output, alpha_t, sample, sigma_t),
        }
    }

    /// The `h_phi_1`, `B(h)` and `b` vector shared by predictor and corrector for step size `h`.
    fn coefficients(&self, h: f64, order: usize) -> (f64, f64, Vec<f64>) {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let b_h = match self.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        (h_phi_1, b_h, b)
    }

    /// `model_outputs[-k]` (k = 1 is the newest).
    fn history(&self, k: usize) -> Result<&Tensor> {
        match self.model_outputs.len().checked_sub(k).and_then(|i| self.model_outputs[i].as_ref()) {
            Some(t) => Ok(t),
            None => candle_core::bail!("UniPC: missing model output history (steps must be consecutive)"),
        }
    }

    /// Combines `base - coef * sum_k rho_k * (m_k - m0) / r_k` (the D1 terms) into a tensor.
    fn add_d1_terms(
        &self,
        base: Tensor,
        m0: &Tensor,
        terms: &[(usize, f64)],
        rhos: &[f64],
        coef: f64,
    ) -> Result<Tensor> {
        let mut out = base;
        for ((k, rk), rho) in terms.iter().zip(rhos) {
            let d1 = (self.history(*k)? - m0)?;
            out = (out + d1.affine(-coef * rho / rk, 0.0)?)?;
        }
        Ok(out)
    }

    /// UniP predictor (`multistep_uni_p_bh_update`) from step `step` to `step + 1`. At order 1 there is no
    /// residual term at all (diffusers multiplies `B(h)` by a zero residual, which is NaN for bh1 at sigma 0).
    fn predictor(&self, x: &Tensor, step: usize, order: usize) -> Result<Tensor> {
        let m0 = self.history(1)?;
        let (alpha_t, sigma_t, lambda_t) = self.lambda_at(step + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.lambda_at(step);
        let h = lambda_t - lambda_s0;
        // (history index, r_k) for the older outputs.
        let mut terms = Vec::new();
        for i in 1..order {
            let (_, _, lambda_si) = self.lambda_at(step - i);
            terms.push((i + 1, (lambda_si - lambda_s0) / h));
        }
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let rhos: Vec<f64> = match terms.len() {
            0 => vec![],
            1 => vec![0.5],
            _ => {
                let rks: Vec<f64> = terms.iter().map(|t| t.1).chain([1.0]).collect();
                solve(&r_matrix(&rks, order - 1), &b[..order - 1])?
            }
        };
        let (base, coef) = if self.predict_x0 {
            (lin2(x, sigma_t / sigma_s0, m0, -alpha_t * h_phi_1)?, alpha_t * b_h)
        } else {
            // sigma_t * (e^h - 1) written as alpha_t * sigma_s0 / alpha_s0 - sigma_t, finite at sigma_t = 0.
            let c = alpha_t * sigma_s0 / alpha_s0 - sigma_t;
            (lin2(x, alpha_t / alpha_s0, m0, -c)?, sigma_t * b_h)
        };
        self.add_d1_terms(base, m0, &terms, &rhos, coef)
    }

    /// UniC corrector (`multistep_uni_c_bh_update`) of the sample at `step` with the new output `model_t`.
    fn corrector(&self, model_t: &Tensor, last_sample: &Tensor, step: usize, order: usize) -> Result<Tensor> {
        let m0 = self.history(1)?;
        let (alpha_t, sigma_t, lambda_t) = self.lambda_at(step);
        let (alpha_s0, sigma_s0, lambda_s0) = self.lambda_at(step - 1);
        let h = lambda_t - lambda_s0;
        let mut terms = Vec::new();
        for i in 1..order {
            let (_, _, lambda_si) = self.lambda_at(step - (i + 1));
            terms.push((i + 1, (lambda_si - lambda_s0) / h));
        }
        let (h_phi_1, b_h, b) = self.coefficients(h, order);
        let rhos_c: Vec<f64> = if order == 1 {
            vec![0.5]
        } else {
            let rks: Vec<f64> = terms.iter().map(|t| t.1).chain([1.0]).collect();
            solve(&r_matrix(&rks, order), &b)?
        };
        let (base, coef) = if self.predict_x0 {
            (lin2(last_sample, sigma_t / sigma_s0, m0, -alpha_t * h_phi_1)?, alpha_t * b_h)
        } else {
            (lin2(last_sample, alpha_t / alpha_s0, m0, -sigma_t * h_phi_1)?, sigma_t * b_h)
        };
        let out = self.add_d1_terms(base, m0, &terms, &rhos_c[..order - 1], coef)?;
        let d1_t = (model_t - m0)?;
        out + d1_t.affine(-coef * rhos_c[order - 1], 0.0)?
    }
}

/// The `size x size` matrix `R[i][j] = rks[j]^i`.
fn r_matrix(rks: &[f64], size: usize) -> Vec<Vec<f64>> {
    (0..size).map(|i| rks[..size].iter().map(|r| r.powi(i as i32)).collect()).collect()
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting.
fn solve(a: &[Vec<f64>], b: &[f64]) -> Result<Vec<f64>> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> =
        a.iter().zip(b).map(|(row, &bi)| row[..n].iter().copied().chain([bi]).collect()).collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs())).unwrap_or(col);
        m.swap(col, pivot);
        let p = m[col][col];
        if p == 0.0 || !p.is_finite() {
            candle_core::bail!("UniPC: singular coefficient system");
        }
        let pivot_row = m[col].clone();
        for row in m.iter_mut().take(n).skip(col + 1) {
            let f = row[col] / p;
            for (v, pv) in row.iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * pv;
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    Ok(x)
}

impl Scheduler for UniPcScheduler {
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
            candle_core::bail!("UniPC: step index {step} out of range ({len} steps)");
        }
        if step != self.next_step {
            // Not the continuation of the previous call (a new run, or img2img starting later): diffusers
            // would start a fresh scheduler here.
            self.model_outputs.iter_mut().for_each(|m| *m = None);
            self.last_sample = None;
            self.this_order = 1;
            self.lower_order_nums = 0;
        }
        self.next_step = step + 1;
        let dtype = sample.dtype();
        let mut x = upcast(sample, dtype)?;
        let m = upcast(model_output, dtype)?;
        let converted = self.convert(&m, &x, step)?;

        let use_corrector = step > 0 && !self.disable_corrector.contains(&(step - 1)) && self.last_sample.is_some();
        if use_corrector {
            if let Some(last) = &self.last_sample {
                x = self.corrector(&converted, last, step, self.this_order)?;
            }
        }

        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));

        let mut order = if self.lower_order_final { self.solver_order.min(len - step) } else { self.solver_order };
        order = order.min(self.lower_order_nums + 1);
        // At sigma 0 (h = +inf) the higher-order terms are inf/NaN in diffusers; the first-order update is
        // the exact limit (x0). Only reachable with lower_order_final = false.
        if self.sigmas[step + 1] == 0.0 {
            order = 1;
        }
        self.this_order = order;
        self.last_sample = Some(x.clone());

        let prev = self.predictor(&x, step, order)?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        prev.to_dtype(dtype)
    }

    fn state(&self) -> SchedulerState {
        let mut tensors: Vec<(String, Tensor)> = (self.model_outputs.iter().enumerate())
            .filter_map(|(i, m)| m.as_ref().map(|t| (format!("model_outputs.{i}"), t.clone())))
            .collect();
        tensors.extend(self.last_sample.as_ref().map(|t| ("last_sample".to_string(), t.clone())));
        let counters = vec![
            ("this_order".into(), self.this_order as u64),
            ("lower_order_nums".into(), self.lower_order_nums as u64),
            ("next_step".into(), self.next_step as u64),
        ];
        SchedulerState { tensors, counters }
    }

    fn restore(&mut self, state: &SchedulerState) -> anyhow::Result<()> {
        for (i, slot) in self.model_outputs.iter_mut().enumerate() {
            *slot = state.tensor(&format!("model_outputs.{i}")).cloned();
        }
        self.last_sample = state.tensor("last_sample").cloned();
        // As `step` leaves them: the warm-up count never passes the steps taken, nor the order it reached.
        self.next_step = state.counter_within("next_step", 0..=self.timesteps.len())?;
        self.lower_order_nums = state.counter_within("lower_order_nums", 0..=self.solver_order.min(self.next_step))?;
        self.this_order = state.counter_within("this_order", 1..=self.lower_order_nums.max(1))?;
        Ok(())
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        if step >= self.timesteps.len() {
            candle_core::bail!("UniPC: step index {step} out of range ({} steps)", self.timesteps.len());
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step] as f64);
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
        check_kind(SchedulerKind::UniPc);
    }
}
