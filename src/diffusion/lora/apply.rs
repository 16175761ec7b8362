//! Applying LoRAs to a loaded pipeline for the length of one generation.
//!
//! The set of LoRAs in effect is shared state of the pipeline, guarded by a read-write lock: a job holds a
//! read guard for its whole generation, so jobs wanting the same set (including "none") run side by side,
//! and a job wanting another set waits until the running ones finish, then swaps the patches. Swapping is
//! skipped when the set is already in effect, so back-to-back jobs with the same LoRAs pay nothing.
//! Patches are merged weights `W + Σ scale · alpha/rank · up·down` computed in f32 (f64 for f64 models) and
//! stored in the layer's dtype; clearing them restores the loaded weights exactly ([`crate::diffusion::adapt`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use parking_lot::{RwLock, RwLockReadGuard, RwLockUpgradableReadGuard, RwLockWriteGuard};

use super::names::{LayerIndex, Target};
use super::{Component, Lora, LoraError};
use crate::diffusion::adapt::AdaptableLayer;

/// A LoRA and the scale to apply it at (1.0 as trained; negative values subtract it).
#[derive(Clone, Debug)]
pub struct LoraWeight {
    pub lora: Arc<Lora>,
    pub scale: f64,
}

/// What is applied now: the LoRAs (by content hash and scale, in order; `None` while patching, so a
/// patching that panicked is never taken for a finished one) and the layers they patched.
pub struct Applied {
    key: Option<Vec<([u8; 32], u64)>>,
    patched: Vec<Arc<dyn AdaptableLayer>>,
}

impl Default for Applied {
    fn default() -> Self {
        Self { key: Some(Vec::new()), patched: Vec::new() }
    }
}

/// The pipeline's adaptable layers and the LoRAs in effect on them.
pub struct Adapters {
    index: LayerIndex,
    /// What the model is, for messages ("an SDXL model").
    model: String,
    applied: RwLock<Applied>,
}

impl std::fmt::Debug for Adapters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapters").field("model", &self.model).finish_non_exhaustive()
    }
}

/// Holds the LoRAs of a generation in effect until dropped.
pub struct InEffect<'a> {
    _guard: RwLockReadGuard<'a, Applied>,
    /// Time spent merging and swapping weights for this generation (0 when the set was already in effect).
    pub apply_ms: f64,
}

/// One layer to patch and the LoRA terms that add up on it.
struct Planned {
    target: Target,
    dims: Vec<usize>,
    /// `(down, up, scale · alpha / rank)`.
    terms: Vec<(Tensor, Tensor, f64)>,
    /// The LoRAs adapting this layer, for messages.
    loras: Vec<String>,
}

impl Adapters {
    pub fn new(index: LayerIndex, model: impl Into<String>) -> Self {
        Self { index, model: model.into(), applied: RwLock::new(Applied::default()) }
    }

    /// Puts `loras` in effect (waiting for generations using another set to finish) and keeps them so until
    /// the returned guard is dropped. Errors leave the loaded weights in effect.
    pub fn enter(&self, loras: &[LoraWeight]) -> Result<InEffect<'_>, LoraError> {
        let want: Vec<([u8; 32], u64)> = loras.iter().map(|l| (l.lora.hash, l.scale.to_bits())).collect();
        let current = self.applied.upgradable_read();
        if current.key.as_ref() == Some(&want) {
            return Ok(InEffect { _guard: RwLockUpgradableReadGuard::downgrade(current), apply_ms: 0.0 });
        }
        let plan = self.plan(loras)?;
        let start = Instant::now();
        let mut applied = RwLockUpgradableReadGuard::upgrade(current);
        for layer in applied.patched.drain(..) {
            let _ = layer.set_patch(None);
        }
        applied.key = None;
        for p in &plan {
            // Pushed first: a failure (or a panic) below still finds the layer to restore.
            applied.patched.push(p.target.layer.clone());
            let result =
                merge(p).and_then(|w| p.target.layer.set_patch(Some(w)).map_err(|e| MergeError::Device(e.to_string())));
            if let Err(e) = result {
                for layer in applied.patched.drain(..) {
                    let _ = layer.set_patch(None);
                }
                applied.key = Some(Vec::new());
                let name = p.loras.join(" + ");
                let at = &p.target.path;
                return Err(match e {
                    MergeError::Overflow(m) => LoraError::Mismatch { name, message: format!("at `{at}`: {m}") },
                    MergeError::Device(m) => LoraError::Apply { name, message: format!("at `{at}`: {m}") },
                });
            }
        }
        applied.key = Some(want);
        let apply_ms = start.elapsed().as_secs_f64() * 1000.0;
        Ok(InEffect { _guard: RwLockWriteGuard::downgrade(applied), apply_ms })
    }

    /// Resolves every layer of every LoRA against the model, checking shapes, grouped by model layer.
    fn plan(&self, loras: &[LoraWeight]) -> Result<Vec<Planned>, LoraError> {
        let mut plan: BTreeMap<(Component, String), Planned> = BTreeMap::new();
        for lw in loras {
            let lora = &lw.lora;
            let mismatch = |message: String| LoraError::Mismatch { name: lora.name.clone(), message };
            if lora.layers.iter().any(|l| !self.index.has_component(l.component)) {
                let c = lora.layers.iter().find(|l| !self.index.has_component(l.component)).map(|l| l.component);
                let what = match c {
                    Some(Component::TextEncoder2) => "a second text encoder (it is an SDXL LoRA)".to_string(),
                    Some(c) => format!("the {c}"),
                    None => unreachable!(),
                };
                return Err(mismatch(format!("adapts {what}, which {} does not have", self.model)));
            }
            let unet_layers = lora.layers.iter().filter(|l| l.component == Component::Unet).count();
            let unet_found = lora
                .layers
                .iter()
                .filter(|l| l.component == Component::Unet && self.index.get(l.component, &l.key).is_some())
                .count();
            // A layer has several names (diffusers' and the original checkpoints'): one file naming it twice
            // would apply it twice.
            let mut named: BTreeMap<(Component, &str), &str> = BTreeMap::new();
            for layer in &lora.layers {
                let Some(target) = self.index.get(layer.component, &layer.key) else {
                    return Err(mismatch(if unet_layers > 0 && unet_found == 0 {
                        format!(
                            "none of its {unet_layers} UNet layers exist in {} (first: `{}`): it was made for another model family",
                            self.model, layer.source
                        )
                    } else {
                        format!("`{}` names no layer of the {} of {}", layer.source, layer.component, self.model)
                    }));
                };
                if let Some(first) = named.insert((layer.component, target.path.as_str()), &layer.source) {
                    return Err(mismatch(format!(
                        "`{first}` and `{}` name the same layer `{}`: it would be applied twice",
                        layer.source, target.path
                    )));
                }
                let dims = target.layer.weight_dims();
                check_shapes(&dims, &layer.down, &layer.up).map_err(|why| {
                    mismatch(format!(
                        "`{}` does not fit `{}` ({why}): the LoRA was made for another model than {}",
                        layer.source, target.path, self.model
                    ))
                })?;
                let entry = plan.entry((layer.component, target.path.clone())).or_insert_with(|| Planned {
                    target: target.clone(),
                    dims,
                    terms: Vec::new(),
                    loras: Vec::new(),
                });
                entry.terms.push((layer.down.clone(), layer.up.clone(), lw.scale * layer.factor()));
                entry.loras.push(lora.name.clone());
            }
        }
        Ok(plan.into_values().collect())
    }
}

/// `[out, in]` for a linear weight, `[out, in, kh, kw]` for a convolution; a 1×1 convolution and a linear
/// layer are interchangeable (diffusers reshapes between them too).
fn normalized(dims: &[usize]) -> Vec<usize> {
    match dims {
        [a, b, 1, 1] => vec![*a, *b],
        d => d.to_vec(),
    }
}

fn check_shapes(weight: &[usize], down: &Tensor, up: &Tensor) -> Result<(), String> {
    let w = normalized(weight);
    let (d, u) = (normalized(down.dims()), normalized(up.dims()));
    if u[0] != w[0] || d[1..] != w[1..] {
        return Err(format!("the LoRA makes {:?} from {:?}, the layer's weight is {w:?}", u[0], &d[1..]));
    }
    Ok(())
}

/// Why a layer could not be patched.
enum MergeError {
    /// The LoRA at its scale takes the weights beyond the dtype: the request's fault.
    Overflow(String),
    /// The device failed (out of memory, ...): worth retrying.
    Device(String),
}

/// The patched weight of one layer, in its dtype and shape.
fn merge(p: &Planned) -> Result<Tensor, MergeError> {
    let run = || -> candle_core::Result<Result<Tensor, String>> {
        let base = p.target.layer.base_weight()?;
        let work = if base.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
        let out = p.dims[0];
        let rest: usize = p.dims[1..].iter().product();
        let mut merged = base.to_dtype(work)?.reshape((out, rest))?;
        for (down, up, factor) in &p.terms {
            let rank = down.dims()[0];
            let up = up.to_device(base.device())?.to_dtype(work)?.reshape((out, rank))?;
            let down = down.to_device(base.device())?.to_dtype(work)?.reshape((rank, rest))?;
            merged = (merged + (up.matmul(&down)? * *factor)?)?;
        }
        let largest = merged.abs()?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // A max skips NaN (inf · 0 from an overflowing product and a zero alpha or scale): NaN ≠ NaN finds it.
        let largest = if merged.ne(&merged)?.max_all()?.to_scalar::<u8>()? != 0 { f64::NAN } else { largest };
        let limit = match base.dtype() {
            DType::F16 => 65504.0,
            DType::BF16 => 3.38e38,
            DType::F32 => f32::MAX as f64,
            _ => f64::MAX,
        };
        if largest.is_nan() || largest > limit {
            return Ok(Err(format!(
                "the merged weights reach {largest:e}, beyond what {:?} holds (is the scale too large?)",
                base.dtype()
            )));
        }
        Ok(Ok(merged.reshape(p.dims.as_slice())?.to_dtype(base.dtype())?))
    };
    match run() {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(overflow)) => Err(MergeError::Overflow(overflow)),
        Err(e) => Err(MergeError::Device(e.to_string())),
    }
}
