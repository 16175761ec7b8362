//! The models a worker serves: a catalogue of `--model` entries whose weights load on first use and stay
//! resident while they fit `--max-resident-bytes`; loading one that does not fit first evicts the least
//! recently used models no job is running on.
//!
//! A model's size is estimated before it loads, from its weight files' tensor headers at the dtype it will
//! run in, so the budget holds at the peak, not only after the fact. Loads run one at a time; a job for a
//! resident model never waits for one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::DType;

use super::ModelSpec;
use crate::generation::{LoadedModel, ModelOptions};

struct Resident {
    model: Arc<LoadedModel>,
    bytes: u64,
    last_used: u64,
}

#[derive(Default)]
struct State {
    resident: BTreeMap<String, Resident>,
    clock: u64,
}

/// How long a model whose load failed is answered with that failure without loading it again: each
/// delivery of its jobs would otherwise evict the idle resident models for a load that fails the same way.
const FAILED_LOAD_KEPT: Duration = Duration::from_secs(60);

/// What a job got from the catalogue: the model, and how long it waited for it to load (`None`: resident).
pub struct Checkout {
    pub model: Arc<LoadedModel>,
    pub load_ms: Option<f64>,
}

pub struct Catalogue {
    specs: BTreeMap<String, ModelSpec>,
    options: ModelOptions,
    /// `None`: no limit.
    budget: Option<u64>,
    state: parking_lot::Mutex<State>,
    /// Held while a model loads: one load at a time.
    loading: tokio::sync::Mutex<()>,
    /// Names of the resident models, readable without waiting for a load (heartbeats, pulling).
    resident_names: parking_lot::RwLock<Vec<String>>,
    /// Models whose last load failed: when, and why.
    failed_loads: parking_lot::Mutex<BTreeMap<String, (Instant, String)>>,
    /// The files signature of each model's last load.
    loaded_signatures: parking_lot::Mutex<BTreeMap<String, String>>,
}

impl Catalogue {
    pub fn new(specs: &[ModelSpec], options: ModelOptions, budget: Option<u64>) -> Self {
        Self {
            specs: specs.iter().map(|s| (s.name.clone(), s.clone())).collect(),
            options,
            budget,
            state: Default::default(),
            loading: Default::default(),
            resident_names: Default::default(),
            failed_loads: Default::default(),
            loaded_signatures: Default::default(),
        }
    }

    /// The [files signature](crate::generation::LoadedModel::files_signature) of `name`'s last load (`None`
    /// before one): each load reads its files again, which may have been replaced since.
    pub fn loaded_signature(&self, name: &str) -> Option<String> {
        self.loaded_signatures.lock().get(name).cloned()
    }

    /// The options `spec` loads with: the catalogue's, with the spec's own files and prediction type.
    pub fn options_for(&self, spec: &ModelSpec) -> ModelOptions {
        ModelOptions {
            config: spec.config.clone(),
            vae: spec.vae.clone(),
            prediction_type: spec.prediction_type.clone(),
            ..self.options.clone()
        }
    }

    /// How its models are loaded (device, dtype, the Hub models' pins).
    pub fn options(&self) -> &ModelOptions {
        &self.options
    }

    /// Every model this worker can serve.
    pub fn names(&self) -> Vec<String> {
        self.specs.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.specs.contains_key(name)
    }

    /// The models whose weights are in memory now.
    pub fn resident(&self) -> Vec<String> {
        self.resident_names.read().clone()
    }

    pub fn is_resident(&self, name: &str) -> bool {
        self.resident_names.read().iter().any(|n| n == name)
    }

    /// The model `name`, loading it first (and evicting others) when it is not resident. Jobs for resident
    /// models never wait for another model's load.
    pub async fn checkout(&self, name: &str) -> anyhow::Result<Checkout> {
        let spec = self.specs.get(name).with_context(|| format!("{name:?} is not in this worker's catalogue"))?;
        if let Some(model) = self.touch(name) {
            return Ok(Checkout { model, load_ms: None });
        }
        let start = Instant::now();
        let _loading = self.loading.lock().await;
        if let Some(model) = self.touch(name) {
            // Loaded by another job meanwhile: this one waited for it all the same.
            return Ok(Checkout { model, load_ms: Some(start.elapsed().as_secs_f64() * 1000.0) });
        }
        if let Some((at, error)) = self.failed_loads.lock().get(name).filter(|(at, _)| at.elapsed() < FAILED_LOAD_KEPT)
        {
            let (ago, kept) = (at.elapsed().as_secs(), FAILED_LOAD_KEPT.as_secs());
            anyhow::bail!("{error} (its load failed {ago} s ago; it is tried again {kept} s after that)");
        }
        let (loaded, bytes) = match self.load(name, spec).await {
            Ok(loaded) => loaded,
            Err(e) => {
                self.failed_loads.lock().insert(name.to_string(), (Instant::now(), format!("{e:#}")));
                return Err(e);
            }
        };
        self.failed_loads.lock().remove(name);
        let model = Arc::new(loaded);
        tracing::info!(model = name, from = %model.display, load_ms = model.load_ms, bytes, "model loaded");
        let mut state = self.state.lock();
        state.clock += 1;
        let last_used = state.clock;
        state.resident.insert(name.to_string(), Resident { model: model.clone(), bytes, last_used });
        self.loaded_signatures.lock().insert(name.to_string(), model.files_signature.clone());
        *self.resident_names.write() = state.resident.keys().cloned().collect();
        Ok(Checkout { model, load_ms: Some(start.elapsed().as_secs_f64() * 1000.0) })
    }

    /// Loads `spec`'s weights, first evicting idle models to make room for them; with their size.
    async fn load(&self, name: &str, spec: &ModelSpec) -> anyhow::Result<(LoadedModel, u64)> {
        let source = spec.source.clone();
        let options = self.options_for(spec);
        let bytes = {
            let (source, options) = (source.clone(), options.clone());
            tokio::task::spawn_blocking(move || model_bytes(&source, &options)).await??
        };
        if let Some(budget) = self.budget {
            self.evict_for(bytes, budget, name);
        }
        let loaded = tokio::task::spawn_blocking(move || crate::generation::load_model(&source, &options))
            .await?
            .with_context(|| format!("model {name}"))?;
        Ok((loaded, bytes))
    }

    /// The resident model `name`, marked as just used.
    fn touch(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let mut state = self.state.lock();
        state.clock += 1;
        let clock = state.clock;
        state.resident.get_mut(name).map(|r| {
            r.last_used = clock;
            r.model.clone()
        })
    }

    /// Evicts least recently used models no job holds until `incoming` bytes fit `budget`. Models in use stay
    /// (the job holding one keeps it alive anyway); if they alone exceed the budget, the load goes ahead over
    /// it, with a warning.
    fn evict_for(&self, incoming: u64, budget: u64, loading: &str) {
        let mut state = self.state.lock();
        loop {
            let used: u64 = state.resident.values().map(|r| r.bytes).sum();
            if used + incoming <= budget {
                return;
            }
            let idle = state
                .resident
                .iter()
                .filter(|(_, r)| Arc::strong_count(&r.model) == 1)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(n, _)| n.clone());
            match idle {
                Some(victim) => {
                    let r = state.resident.remove(&victim).expect("listed");
                    tracing::info!(model = victim, bytes = r.bytes, for_model = loading, "model evicted");
                    *self.resident_names.write() = state.resident.keys().cloned().collect();
                }
                None => {
                    tracing::warn!(
                        model = loading,
                        needed = used + incoming,
                        budget,
                        "the models in use leave no room; loading over --max-resident-bytes"
                    );
                    return;
                }
            }
        }
    }

    /// Loads models in catalogue order while they fit the budget (all of them without one), so the first
    /// jobs do not wait; a model that cannot load is an error here, at start.
    pub async fn preload(&self) -> anyhow::Result<()> {
        let mut used = 0u64;
        for (name, spec) in &self.specs {
            let (source, options) = (spec.source.clone(), self.options.clone());
            let bytes = tokio::task::spawn_blocking(move || model_bytes(&source, &options)).await??;
            if self.budget.is_some_and(|b| used + bytes > b) {
                continue;
            }
            self.checkout(name).await?;
            used += bytes;
        }
        Ok(())
    }
}

/// The bytes the model `source` will take: [`estimate_bytes`] of its folder or file; a Hub repo or short name
/// is fetched into the Hugging Face cache first (or found there offline), so it is sized before it loads too.
fn model_bytes(source: &str, options: &ModelOptions) -> anyhow::Result<u64> {
    let dtype = options.dtype.unwrap_or(DType::F32);
    if let Some(arch) = source.strip_prefix(crate::generation::RANDOM_PREFIX) {
        return Ok(random_parameters(arch)? * dtype.size_in_bytes() as u64);
    }
    if Path::new(source).exists() {
        return estimate_bytes(source, dtype);
    }
    let resolved = crate::generation::resolve_hub(source, options)?;
    estimate_bytes(&resolved.dir.display().to_string(), dtype)
}

/// Parameters of a `random:` model (text encoders, UNet and VAE of the real architecture); the inpainting
/// UNets' five extra input channels are a rounding error here.
fn random_parameters(arch: &str) -> anyhow::Result<u64> {
    use crate::diffusion::checkpoint::Family;
    let (arch, _) = crate::generation::parse_random(arch)?;
    Ok(match arch.family {
        Family::Sd1 => 1_066_000_000,
        Family::Sd2 => 1_290_000_000,
        Family::Sdxl => 3_470_000_000,
    })
}

/// The bytes a model's weights take at `dtype`: the float tensors of its weight files (of a single file, those
/// under the prefixes a pipeline reads: not `model_ema.*`), as their headers give them.
pub fn estimate_bytes(source: &str, dtype: DType) -> anyhow::Result<u64> {
    let path = Path::new(source);
    if path.is_file() {
        let file = crate::diffusion::weights::ReleasingSafetensors::open(path)?;
        const READ: [&str; 4] = ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."];
        let elements: u64 = file
            .float_tensors()
            .filter(|(name, _)| READ.iter().any(|p| name.starts_with(p)))
            .map(|(_, shape)| shape.iter().product::<usize>() as u64)
            .sum();
        return Ok(elements * dtype.size_in_bytes() as u64);
    }
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut out = Vec::new();
        for (part, stem) in [
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
            ("text_encoder", "model"),
            ("text_encoder_2", "model"),
        ] {
            if path.join(part).is_dir() {
                out.extend(crate::diffusion::weights::find_weights(&path.join(part), stem, dtype == DType::F16)?);
            }
        }
        out
    } else {
        return Ok(0);
    };
    let mut total = 0u64;
    for f in files {
        let file = crate::diffusion::weights::ReleasingSafetensors::open(&f)?;
        for (_, shape) in file.float_tensors() {
            total += shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        }
    }
    Ok(total)
}

/// Parses a size: bytes, or a number with `K`, `M`, `G`, `T` (powers of 1024; `KiB`, `MB`, ... accepted).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size (e.g. 12GiB, 800M, 1048576)"))?;
    let scale = match unit.trim().to_ascii_uppercase().trim_end_matches('B').trim_end_matches('I') {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    Ok((value * scale as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose load fails is not loaded again (evicting the others for it) at each of its jobs.
    #[tokio::test]
    async fn a_model_that_fails_to_load_evicts_nothing_the_next_time() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let good = fixtures.join("tiny-sd15");
        let scratch = tempfile::tempdir().unwrap();
        let bad = scratch.path().join("bad");
        for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            std::fs::create_dir_all(bad.join(part)).unwrap();
            for f in std::fs::read_dir(good.join(part)).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), bad.join(part).join(f.file_name())).unwrap();
            }
        }
        std::fs::copy(good.join("model_index.json"), bad.join("model_index.json")).unwrap();
        let config = bad.join("unet/config.json");
        let text = std::fs::read_to_string(&config).unwrap();
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["norm_num_groups"] = 0.into();
        std::fs::write(&config, value.to_string()).unwrap();

        let spec = |name: &str, path: &Path| -> ModelSpec { format!("{name}={}", path.display()).parse().unwrap() };
        let size = estimate_bytes(good.to_str().unwrap(), DType::F32).unwrap();
        // Room for one of the two.
        let catalogue = Catalogue::new(&[spec("good", &good), spec("bad", &bad)], ModelOptions::default(), Some(size));
        drop(catalogue.checkout("good").await.unwrap());
        let first = catalogue.checkout("bad").await.err().unwrap();
        assert!(format!("{first:#}").contains("norm_num_groups"), "{first:#}");
        assert!(!catalogue.is_resident("good"), "evicted for the load");
        drop(catalogue.checkout("good").await.unwrap());
        let again = catalogue.checkout("bad").await.err().unwrap();
        assert!(
            format!("{again:#}").contains("norm_num_groups") && format!("{again:#}").contains("s ago"),
            "{again:#}"
        );
        assert!(catalogue.is_resident("good"), "not evicted for a load that failed just now");
    }

    #[test]
    fn random_models_are_sized_without_files() {
        let f32 = model_bytes("random:sd15", &ModelOptions::default()).unwrap();
        assert!((4_000_000_000..4_500_000_000).contains(&f32), "{f32}");
        let options = ModelOptions { dtype: Some(DType::F16), ..Default::default() };
        assert_eq!(model_bytes("random:sdxl:3", &options).unwrap(), 2 * 3_470_000_000);
        assert!(model_bytes("random:sd4", &options).is_err());
    }

    #[test]
    fn sizes_and_estimates() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("12GiB").unwrap(), 12 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("800 MB").unwrap(), 800 << 20);
        assert!(parse_size("lots").is_err() && parse_size("3 parsecs").is_err());

        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let folder = estimate_bytes(fixtures.join("tiny-sd15").to_str().unwrap(), DType::F32).unwrap();
        let half = estimate_bytes(fixtures.join("tiny-sd15").to_str().unwrap(), DType::F16).unwrap();
        let file =
            estimate_bytes(fixtures.join("single-file/tiny-sd15.safetensors").to_str().unwrap(), DType::F32).unwrap();
        assert_eq!(folder, 2 * half);
        assert!(folder > 1_000_000 && (file as i64 - folder as i64).abs() < 1000, "{folder} vs {file}");
    }
}
