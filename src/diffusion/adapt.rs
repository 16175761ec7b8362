//! Layers whose weight can be swapped for a job and swapped back: how LoRAs are applied without touching the
//! loaded weights.
//!
//! Every linear and convolution layer of the UNet and the text encoders is an [`Adaptable`]: the pristine
//! layer as loaded, plus an optional patched copy that `forward` uses instead while it is set. Clearing the
//! patch brings back the very tensors that were loaded, so a job after a LoRA job runs on bit-identical
//! weights by construction (nothing is subtracted back).
//!
//! Layers register themselves under their weight path (`down_blocks.0.attentions.0.proj_in`) while a
//! component is built inside [`record`]; the resulting [`LayerTable`] is how LoRA keys find their layers.
//! Recording is scoped to the building thread, so the model constructors keep their plain `VarBuilder`
//! signatures and layers built outside a recording (the VAE's) are simply not listed.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use parking_lot::RwLock;

use super::linear::LinearKernel;

/// A layer with one weight tensor that can be rebuilt around another weight of the same shape.
pub trait Weighted: Module + Send + Sync + Sized + 'static {
    /// The weight as the layer uses it: `[out, in]`, or `[out, in, kh, kw]` for a convolution.
    fn weight(&self) -> Result<Tensor>;
    /// The weight's shape, without building it.
    fn weight_dims(&self) -> Vec<usize>;
    /// The same layer (bias, padding, stride) with `weight` instead.
    fn with_weight(&self, weight: Tensor) -> Result<Self>;
}

impl Weighted for candle_nn::Linear {
    fn weight(&self) -> Result<Tensor> {
        Ok(candle_nn::Linear::weight(self).clone())
    }
    fn weight_dims(&self) -> Vec<usize> {
        candle_nn::Linear::weight(self).dims().to_vec()
    }
    fn with_weight(&self, weight: Tensor) -> Result<Self> {
        Ok(candle_nn::Linear::new(weight, self.bias().cloned()))
    }
}

/// What the LoRA code sees of a registered layer.
pub trait AdaptableLayer: Send + Sync {
    /// The loaded weight (never the patched one).
    fn base_weight(&self) -> Result<Tensor>;
    fn weight_dims(&self) -> Vec<usize>;
    /// Uses `weight` (same shape and dtype as the base) from now on, or the base again with `None`.
    fn set_patch(&self, weight: Option<Tensor>) -> Result<()>;
    fn is_patched(&self) -> bool;
}

struct Slot<L> {
    base: L,
    patch: RwLock<Option<L>>,
}

impl<L: Weighted> AdaptableLayer for Slot<L> {
    fn base_weight(&self) -> Result<Tensor> {
        self.base.weight()
    }

    fn weight_dims(&self) -> Vec<usize> {
        self.base.weight_dims()
    }

    fn set_patch(&self, weight: Option<Tensor>) -> Result<()> {
        let patched = weight.map(|w| self.base.with_weight(w)).transpose()?;
        *self.patch.write() = patched;
        Ok(())
    }

    fn is_patched(&self) -> bool {
        self.patch.read().is_some()
    }
}

/// A layer that runs its patched copy while one is set, else the layer as loaded.
pub struct Adaptable<L>(Arc<Slot<L>>);

impl<L: Weighted + std::fmt::Debug> std::fmt::Debug for Adaptable<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.base.fmt(f)
    }
}

impl<L: Weighted> Adaptable<L> {
    /// Wraps `layer`, registering it as `path` when a [`record`] is under way on this thread.
    pub fn new(layer: L, path: &str) -> Self {
        let slot = Arc::new(Slot { base: layer, patch: RwLock::new(None) });
        RECORDING.with(|r| {
            if let Some(table) = r.borrow_mut().as_mut() {
                table.0.insert(path.to_string(), slot.clone() as Arc<dyn AdaptableLayer>);
            }
        });
        Self(slot)
    }

    /// The layer as loaded.
    pub fn base(&self) -> &L {
        &self.0.base
    }

    /// Runs `f` on the layer `forward` uses now: the patched copy while one is set, else the one loaded.
    pub fn with_current<R>(&self, f: impl FnOnce(&L) -> R) -> R {
        match &*self.0.patch.read() {
            Some(patched) => f(patched),
            None => f(&self.0.base),
        }
    }
}

impl<L: Weighted> Module for Adaptable<L> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &*self.0.patch.read() {
            Some(patched) => patched.forward(x),
            None => self.0.base.forward(x),
        }
    }
}

/// A linear layer that LoRAs can adapt.
pub type Linear = Adaptable<LinearKernel>;

/// `candle_nn::linear_b` (weight `[out, in]`, optional bias), adaptable.
pub fn linear_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let path = vb.prefix();
    Ok(Adaptable::new(LinearKernel::new(candle_nn::linear_b(in_dim, out_dim, bias, vb)?), &path))
}

/// A linear layer with a bias, adaptable.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_b(in_dim, out_dim, true, vb)
}

/// The adaptable layers of one component, by weight path.
#[derive(Clone, Default)]
pub struct LayerTable(BTreeMap<String, Arc<dyn AdaptableLayer>>);

impl std::fmt::Debug for LayerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LayerTable({} layers)", self.0.len())
    }
}

impl LayerTable {
    pub fn get(&self, path: &str) -> Option<&Arc<dyn AdaptableLayer>> {
        self.0.get(path)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<dyn AdaptableLayer>)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

thread_local! {
    static RECORDING: RefCell<Option<LayerTable>> = const { RefCell::new(None) };
}

/// Runs `build` and returns what it built with the table of the adaptable layers it created.
pub fn record<T>(build: impl FnOnce() -> T) -> (T, LayerTable) {
    /// Puts the enclosing recording (if any) back, also when `build` panics.
    struct Scope(Option<Option<LayerTable>>);
    impl Scope {
        fn finish(mut self) -> LayerTable {
            let outer = self.0.take().flatten();
            RECORDING.with(|r| std::mem::replace(&mut *r.borrow_mut(), outer)).unwrap_or_default()
        }
    }
    impl Drop for Scope {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                RECORDING.with(|r| *r.borrow_mut() = outer);
            }
        }
    }
    let scope = Scope(Some(RECORDING.with(|r| r.borrow_mut().replace(LayerTable::default()))));
    let built = build();
    (built, scope.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn a_patch_is_used_until_cleared_and_the_base_is_never_touched() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let vb = VarBuilder::from_tensors(
            [("l.weight".to_string(), w.clone()), ("l.bias".to_string(), Tensor::zeros(2, DType::F32, &dev).unwrap())]
                .into(),
            DType::F32,
            &dev,
        );
        let (layer, table) = record(|| linear(2, 2, vb.pp("l")).unwrap());
        let outside = linear(2, 2, vb.pp("l")).unwrap();
        assert_eq!(table.len(), 1, "only the layer built inside the recording is listed");
        drop(outside);
        let x = Tensor::new(&[[1f32, 1.]], &dev).unwrap();
        let slot = table.get("l").unwrap();
        slot.set_patch(Some((w.clone() * 10.0).unwrap())).unwrap();
        assert!(slot.is_patched());
        assert_eq!(layer.forward(&x).unwrap().to_vec2::<f32>().unwrap(), [[30., 70.]]);
        slot.set_patch(None).unwrap();
        assert_eq!(layer.forward(&x).unwrap().to_vec2::<f32>().unwrap(), [[3., 7.]]);
        assert_eq!(slot.base_weight().unwrap().to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
