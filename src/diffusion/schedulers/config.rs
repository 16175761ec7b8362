//! A model's `scheduler/scheduler_config.json`, read as diffusers reads it (Python's JSON included: bare
//! `Infinity` and `NaN` tokens).

use std::path::Path;

use anyhow::Context;

use super::PredictionType;

/// `scheduler_config.json` as diffusers stores it; every key optional, unknown keys ignored.
///
/// Each scheduler reads only the keys its diffusers class accepts (as `Class.from_config` does) and uses that
/// class's default for every key that is missing or `null`.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub interpolation_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub timestep_type: Option<String>,
    pub solver_order: Option<usize>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    /// Karras sigma range overrides (Euler and UniPC take them as arguments; DPM-Solver reads them from a
    /// config written by another class too, as diffusers keeps such "hidden" keys in `scheduler.config`).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub use_dynamic_shifting: Option<bool>,
    pub shift_terminal: Option<f64>,
    /// DPM-Solver: clip lambda(t) from below (diffusers writes the default -inf as `-Infinity`, read as unset).
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    /// UniPC: predict x0 (true) or the noise (false).
    pub predict_x0: Option<bool>,
    /// UniPC: step indices after which the corrector is skipped.
    pub disable_corrector: Option<Vec<usize>>,
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` text. Python's non-standard `Infinity`/`-Infinity`/`NaN` literals (which
    /// diffusers writes, e.g. for `lambda_min_clipped`) are read as `null`, and keys listed in
    /// `_use_default_values` are dropped, as diffusers' `from_config` does.
    pub fn from_json_str(s: &str) -> anyhow::Result<Self> {
        let cleaned = replace_non_finite_literals(s);
        let mut value: serde_json::Value =
            serde_json::from_str(&cleaned).context("scheduler config is not valid JSON")?;
        let map = value.as_object_mut().context("scheduler config must be a JSON object")?;
        if let Some(defaults) = map.remove("_use_default_values") {
            if let Some(keys) = defaults.as_array() {
                for key in keys.iter().filter_map(|k| k.as_str()) {
                    map.remove(key);
                }
            }
        }
        match serde_json::from_value::<SchedulerConfig>(value.clone()) {
            Ok(config) => Ok(config),
            Err(err) => {
                // Name the offending key: retry each key on its own.
                if let Some(map) = value.as_object() {
                    for (key, val) in map {
                        let single = serde_json::Value::Object([(key.clone(), val.clone())].into_iter().collect());
                        if let Err(e) = serde_json::from_value::<SchedulerConfig>(single) {
                            anyhow::bail!("scheduler config: bad value for {key} = {val}: {e}");
                        }
                    }
                }
                Err(anyhow::Error::new(err).context("scheduler config"))
            }
        }
    }

    /// Reads and parses `scheduler_config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading scheduler config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("parsing scheduler config {}", path.display()))
    }

    /// `prediction_type`, defaulting to epsilon.
    pub fn prediction(&self) -> anyhow::Result<PredictionType> {
        match self.prediction_type.as_deref() {
            None | Some("epsilon") => Ok(PredictionType::Epsilon),
            Some("v_prediction") => Ok(PredictionType::VPrediction),
            Some("sample") => Ok(PredictionType::Sample),
            Some(other) => anyhow::bail!(
                "scheduler config: prediction_type = \"{other}\" is not supported \
                 (expected epsilon, v_prediction or sample)"
            ),
        }
    }
}

/// Replaces the bare `Infinity`, `-Infinity` and `NaN` tokens Python's json module writes with `null`
/// (string contents are left alone).
fn replace_non_finite_literals(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}
