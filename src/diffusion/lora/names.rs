//! Which model layer a LoRA key names.
//!
//! LoRA files name layers by their module path with `_` for `.` (kohya) or with dots (PEFT, turned into the
//! `_` form by the parser). The UNet's layers can also be named in the original LDM/SGM numbering that SDXL
//! kohya LoRAs use (`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_…`, resnet parts as
//! `in_layers_2`/`out_layers_3`/`emb_layers_1`/`skip_connection`). Rather than parse names back, the index
//! lists every name each of the model's own layers can go by, so a key either matches one layer exactly or
//! none. The SGM numbering is derived from the model's own blocks ([`UnetNumbering`]), so any block layout
//! maps as diffusers' `_maybe_map_sgm_blocks_to_diffusers` maps it.

use std::collections::HashMap;
use std::sync::Arc;

use super::Component;
use crate::diffusion::adapt::{AdaptableLayer, LayerTable};
use crate::diffusion::checkpoint::names::UnetNumbering;

/// A model layer a key resolves to.
#[derive(Clone)]
pub struct Target {
    /// The weight path (`down_blocks.0.attentions.0.proj_in`).
    pub path: String,
    pub layer: Arc<dyn AdaptableLayer>,
}

/// Every name each adaptable layer of a pipeline goes by.
#[derive(Clone, Default)]
pub struct LayerIndex {
    by_key: HashMap<(Component, String), Target>,
    components: Vec<Component>,
}

impl LayerIndex {
    /// `tables`: each component's adaptable layers.
    pub fn new(tables: &[(Component, &LayerTable)]) -> Self {
        let mut by_key = HashMap::new();
        let mut ambiguous = Vec::new();
        for (component, table) in tables {
            let sgm = (*component == Component::Unet).then(|| UnetNumbering::from_paths(table.iter().map(|(p, _)| p)));
            for (path, layer) in table.iter() {
                let own = match component {
                    Component::Unet => path,
                    _ => path.strip_prefix("text_model.").unwrap_or(path),
                };
                let mut names = vec![own.to_string()];
                if let Some(sgm) = &sgm {
                    names.extend(sgm.names(path));
                }
                for name in names {
                    let key = (*component, name.replace('.', "_"));
                    let target = Target { path: path.to_string(), layer: layer.clone() };
                    if let Some(other) = by_key.insert(key.clone(), target) {
                        if other.path != path {
                            ambiguous.push(key);
                        }
                    }
                }
            }
        }
        // A name two layers could go by is no name at all (never seen in real models; kept safe).
        for key in ambiguous {
            by_key.remove(&key);
        }
        Self { by_key, components: tables.iter().map(|(c, _)| *c).collect() }
    }

    pub fn get(&self, component: Component, key: &str) -> Option<&Target> {
        self.by_key.get(&(component, key.to_string()))
    }

    pub fn has_component(&self, component: Component) -> bool {
        self.components.contains(&component)
    }
}
