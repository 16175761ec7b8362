//! Which model layer a LoRA key names.
//!
//! LoRA files name layers by their module path with `_` for `.` (kohya) or with dots (PEFT, turned into the
//! `_` form by the parser). The UNet's layers can also be named in the original LDM/SGM numbering that SDXL
//! kohya LoRAs use (`input_blocks_4_1_…`, `middle_block_1_…`, `output_blocks_…`, resnet parts as
//! `in_layers_2`/`out_layers_3`/`emb_layers_1`/`skip_connection`). Rather than parse names back, the index
//! lists every name each of the model's own layers can go by, so a key either matches one layer exactly or
//! none. The SGM numbering is derived from the model's own blocks (layers per block, which blocks have
//! attentions and samplers), so any block layout maps as diffusers' `_maybe_map_sgm_blocks_to_diffusers`
//! maps it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Component;
use crate::diffusion::adapt::{AdaptableLayer, LayerTable};

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
            let sgm = (*component == Component::Unet).then(|| SgmNumbering::of(table));
            for (path, layer) in table.iter() {
                let own = match component {
                    Component::Unet => path,
                    _ => path.strip_prefix("text_model.").unwrap_or(path),
                };
                let mut names = vec![own.to_string()];
                if let Some(sgm) = &sgm {
                    names.extend(sgm.aliases(path));
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

/// The UNet's blocks as the original numbering counts them.
#[derive(Debug, Default)]
struct SgmNumbering {
    /// `(down block, layer)` → `input_blocks` index.
    input: BTreeMap<(usize, usize), usize>,
    /// down block → `input_blocks` index of its downsampler.
    downsampler: BTreeMap<usize, usize>,
    /// `(up block, layer)` → `output_blocks` index.
    output: BTreeMap<(usize, usize), usize>,
    /// up block → (`output_blocks` index, position of the upsampler in it).
    upsampler: BTreeMap<usize, (usize, usize)>,
}

/// `down_blocks.{i}.{part}.{j}.…` → `(i, part, j)`.
fn block_part(path: &str, blocks: &str) -> Option<(usize, String, usize)> {
    let mut it = path.strip_prefix(blocks)?.strip_prefix('.')?.split('.');
    let i = it.next()?.parse().ok()?;
    let part = it.next()?.to_string();
    let j = it.next()?.parse().ok()?;
    Some((i, part, j))
}

impl SgmNumbering {
    fn of(unet: &LayerTable) -> Self {
        // What each block holds: (layers, has attentions, has a sampler).
        let mut down: BTreeMap<usize, (usize, bool, bool)> = BTreeMap::new();
        let mut up: BTreeMap<usize, (usize, bool, bool)> = BTreeMap::new();
        for (path, _) in unet.iter() {
            for (blocks, map) in [("down_blocks", &mut down), ("up_blocks", &mut up)] {
                if let Some((i, part, j)) = block_part(path, blocks) {
                    let e = map.entry(i).or_default();
                    match part.as_str() {
                        "resnets" => e.0 = e.0.max(j + 1),
                        "attentions" => e.1 = true,
                        "downsamplers" | "upsamplers" => e.2 = true,
                        _ => {}
                    }
                }
            }
        }
        let mut n = Self::default();
        let mut idx = 1; // input_blocks.0 is conv_in
        for (&i, &(layers, _, sampler)) in &down {
            for j in 0..layers {
                n.input.insert((i, j), idx);
                idx += 1;
            }
            if sampler {
                n.downsampler.insert(i, idx);
                idx += 1;
            }
        }
        let mut idx = 0;
        for (&i, &(layers, attn, sampler)) in &up {
            for j in 0..layers {
                n.output.insert((i, j), idx);
                idx += 1;
            }
            if sampler && layers > 0 {
                n.upsampler.insert(i, (idx - 1, if attn { 2 } else { 1 }));
            }
        }
        n
    }

    /// The original-numbering names of the layer at `path` (none for layers that have no other name).
    fn aliases(&self, path: &str) -> Vec<String> {
        const TOP: [(&str, &str); 6] = [
            ("conv_in", "input_blocks.0.0"),
            ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("add_embedding.linear_1", "label_emb.0.0"),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_out", "out.2"),
        ];
        if let Some((_, alias)) = TOP.iter().find(|(p, _)| *p == path) {
            return vec![alias.to_string()];
        }
        let rest_after = |n: usize| path.splitn(n + 1, '.').nth(n).unwrap_or("").to_string();
        let resnet = |prefix: String, rest: &str| {
            let mut names = vec![format!("{prefix}.{rest}")];
            let ldm = match rest {
                "conv1" => Some("in_layers.2"),
                "conv2" => Some("out_layers.3"),
                "time_emb_proj" => Some("emb_layers.1"),
                "conv_shortcut" => Some("skip_connection"),
                _ => None,
            };
            names.extend(ldm.map(|l| format!("{prefix}.{l}")));
            names
        };
        if let Some((i, part, j)) = block_part(path, "down_blocks") {
            let rest = rest_after(4);
            return match part.as_str() {
                "resnets" => self.input.get(&(i, j)).map(|k| resnet(format!("input_blocks.{k}.0"), &rest)),
                "attentions" => self.input.get(&(i, j)).map(|k| vec![format!("input_blocks.{k}.1.{rest}")]),
                "downsamplers" if rest == "conv" => {
                    self.downsampler.get(&i).map(|k| vec![format!("input_blocks.{k}.0.op")])
                }
                _ => None,
            }
            .unwrap_or_default();
        }
        if let Some((i, part, j)) = block_part(path, "up_blocks") {
            let rest = rest_after(4);
            return match part.as_str() {
                "resnets" => self.output.get(&(i, j)).map(|k| resnet(format!("output_blocks.{k}.0"), &rest)),
                "attentions" => self.output.get(&(i, j)).map(|k| vec![format!("output_blocks.{k}.1.{rest}")]),
                "upsamplers" if rest == "conv" => {
                    self.upsampler.get(&i).map(|(k, at)| vec![format!("output_blocks.{k}.{at}.conv")])
                }
                _ => None,
            }
            .unwrap_or_default();
        }
        if let Some(tail) = path.strip_prefix("mid_block.") {
            let mut it = tail.splitn(3, '.');
            let (part, j, rest) = (it.next().unwrap_or(""), it.next().and_then(|j| j.parse::<usize>().ok()), it.next());
            return match (part, j, rest) {
                ("resnets", Some(j), Some(rest)) => resnet(format!("middle_block.{}", 2 * j), rest),
                ("attentions", Some(j), Some(rest)) => vec![format!("middle_block.{}.{rest}", 2 * j + 1)],
                _ => Vec::new(),
            };
        }
        Vec::new()
    }
}
