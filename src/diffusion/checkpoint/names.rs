//! Where each tensor of a diffusers model lives in an original (LDM/SGM) single-file checkpoint, the layout
//! the CompVis/Stability repositories and most fine-tunes publish.
//!
//! The UNet's blocks are numbered flat there: `input_blocks.N` (a resnet at `.0`, its attention at `.1`, a
//! downsampler alone as `.0.op`), `middle_block.0/1/2`, `output_blocks.N` (the upsampler after the attention,
//! at `.1` or `.2`); resnet parts have their own names (`in_layers.2` for `conv1`, ...). [`UnetNumbering`]
//! derives that numbering from a model's own blocks, so any layout maps (diffusers'
//! `convert_ldm_unet_checkpoint` does the same from `layers_per_block`); LoRAs in SGM names use it too.
//! The VAE (`first_stage_model.`), CLIP (`…transformer.text_model.`) and OpenCLIP (`…model.`, q/k/v stacked
//! in `attn.in_proj_weight`) map by fixed rules; see [`vae`], [`clip`], [`open_clip`].

use std::collections::BTreeMap;

use crate::diffusion::unet_2d::UNet2DConditionConfig;

/// Where a diffusers tensor comes from in a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The tensor of that name, as stored.
    Tensor(String),
    /// Rows `[start, start + len)` of a tensor (one of q, k, v in a stacked `in_proj`).
    Rows { name: String, start: usize, len: usize },
    /// The transpose of a 2-D tensor (OpenCLIP's `text_projection` is stored `[in, out]`).
    Transposed(String),
}

/// What one UNet block holds, as the numbering needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockLayout {
    pub layers: usize,
    pub attentions: bool,
    pub sampler: bool,
}

/// The original numbering of a UNet's blocks.
#[derive(Debug, Default)]
pub struct UnetNumbering {
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
fn block_part<'a>(path: &'a str, blocks: &str) -> Option<(usize, &'a str, usize)> {
    let mut it = path.strip_prefix(blocks)?.strip_prefix('.')?.split('.');
    let i = it.next()?.parse().ok()?;
    let part = it.next()?;
    let j = it.next()?.parse().ok()?;
    Some((i, part, j))
}

/// The part of `path` after its first `n` dot-separated segments.
fn after(path: &str, n: usize) -> &str {
    path.splitn(n + 1, '.').nth(n).unwrap_or("")
}

/// diffusers resnet parts and their original names.
const RESNET: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// diffusers top-level modules and their original names.
const TOP: [(&str, &str); 7] = [
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
];

impl UnetNumbering {
    pub fn new(down: &[BlockLayout], up: &[BlockLayout]) -> Self {
        let mut n = Self::default();
        let mut idx = 1; // input_blocks.0 is conv_in
        for (i, b) in down.iter().enumerate() {
            for j in 0..b.layers {
                n.input.insert((i, j), idx);
                idx += 1;
            }
            if b.sampler {
                n.downsampler.insert(i, idx);
                idx += 1;
            }
        }
        let mut idx = 0;
        for (i, b) in up.iter().enumerate() {
            for j in 0..b.layers {
                n.output.insert((i, j), idx);
                idx += 1;
            }
            if b.sampler && b.layers > 0 {
                n.upsampler.insert(i, (idx - 1, if b.attentions { 2 } else { 1 }));
            }
        }
        n
    }

    /// The numbering of the UNet a config describes (up blocks have one layer more than down blocks).
    pub fn from_config(config: &UNet2DConditionConfig) -> anyhow::Result<Self> {
        let n = config.block_out_channels.len();
        let layers = config.layers_per_block.expand("layers_per_block", n)?;
        let down: Vec<BlockLayout> = (0..n)
            .map(|i| BlockLayout {
                layers: layers[i],
                attentions: config.down_block_types.get(i).is_some_and(|t| t.contains("CrossAttn")),
                sampler: i + 1 < n,
            })
            .collect();
        let up: Vec<BlockLayout> = (0..n)
            .map(|i| BlockLayout {
                layers: layers[n - 1 - i] + 1,
                attentions: config.up_block_types.get(i).is_some_and(|t| t.contains("CrossAttn")),
                sampler: i + 1 < n,
            })
            .collect();
        Ok(Self::new(&down, &up))
    }

    /// The numbering of the UNet whose module paths are `paths` (what a built model lists).
    pub fn from_paths<'a>(paths: impl Iterator<Item = &'a str>) -> Self {
        let (mut down, mut up): (BTreeMap<usize, BlockLayout>, BTreeMap<usize, BlockLayout>) = Default::default();
        for path in paths {
            for (blocks, map) in [("down_blocks", &mut down), ("up_blocks", &mut up)] {
                if let Some((i, part, j)) = block_part(path, blocks) {
                    let e = map.entry(i).or_default();
                    match part {
                        "resnets" => e.layers = e.layers.max(j + 1),
                        "attentions" => e.attentions = true,
                        "downsamplers" | "upsamplers" => e.sampler = true,
                        _ => {}
                    }
                }
            }
        }
        let dense = |m: BTreeMap<usize, BlockLayout>| -> Vec<BlockLayout> {
            let len = m.keys().next_back().map_or(0, |k| k + 1);
            (0..len).map(|i| m.get(&i).copied().unwrap_or_default()).collect()
        };
        Self::new(&dense(down), &dense(up))
    }

    /// The original name of the UNet module at `path` (`down_blocks.1.resnets.0.conv1` →
    /// `input_blocks.4.0.in_layers.2`); `None` for a path outside the numbered blocks.
    pub fn ldm_module(&self, path: &str) -> Option<String> {
        self.names(path).into_iter().next()
    }

    /// Every original name of `path`: [`Self::ldm_module`] first, then for resnet parts the block number with
    /// the diffusers part name (`input_blocks.4.0.conv1`), which SGM-named LoRAs also use.
    pub fn names(&self, path: &str) -> Vec<String> {
        if let Some((_, ldm)) = TOP.iter().find(|(p, _)| *p == path) {
            return vec![ldm.to_string()];
        }
        let resnet = |prefix: String, rest: &str| -> Vec<String> {
            match RESNET.iter().find(|(d, _)| *d == rest) {
                Some((_, ldm)) => vec![format!("{prefix}.{ldm}"), format!("{prefix}.{rest}")],
                None => vec![format!("{prefix}.{rest}")],
            }
        };
        let names = if let Some((i, part, j)) = block_part(path, "down_blocks") {
            let rest = after(path, 4);
            match part {
                "resnets" => self.input.get(&(i, j)).map(|k| resnet(format!("input_blocks.{k}.0"), rest)),
                "attentions" => self.input.get(&(i, j)).map(|k| vec![format!("input_blocks.{k}.1.{rest}")]),
                "downsamplers" if rest == "conv" => {
                    self.downsampler.get(&i).map(|k| vec![format!("input_blocks.{k}.0.op")])
                }
                _ => None,
            }
        } else if let Some((i, part, j)) = block_part(path, "up_blocks") {
            let rest = after(path, 4);
            match part {
                "resnets" => self.output.get(&(i, j)).map(|k| resnet(format!("output_blocks.{k}.0"), rest)),
                "attentions" => self.output.get(&(i, j)).map(|k| vec![format!("output_blocks.{k}.1.{rest}")]),
                "upsamplers" if rest == "conv" => {
                    self.upsampler.get(&i).map(|(k, at)| vec![format!("output_blocks.{k}.{at}.conv")])
                }
                _ => None,
            }
        } else if let Some(tail) = path.strip_prefix("mid_block.") {
            let mut it = tail.splitn(3, '.');
            match (it.next(), it.next().and_then(|j| j.parse::<usize>().ok()), it.next()) {
                (Some("resnets"), Some(j), Some(rest)) => Some(resnet(format!("middle_block.{}", 2 * j), rest)),
                (Some("attentions"), Some(j), Some(rest)) => Some(vec![format!("middle_block.{}.{rest}", 2 * j + 1)]),
                _ => None,
            }
        } else {
            None
        };
        names.unwrap_or_default()
    }
}

/// `module.param` → `(module, param)`.
fn split_param(name: &str) -> Option<(&str, &str)> {
    name.rsplit_once('.')
}

/// A UNet tensor's name in a checkpoint (`prefix` is `model.diffusion_model.`).
pub fn unet(numbering: &UnetNumbering, prefix: &str, name: &str) -> Option<Source> {
    let (module, param) = split_param(name)?;
    let ldm = numbering.ldm_module(module)?;
    Some(Source::Tensor(format!("{prefix}{ldm}.{param}")))
}

/// A VAE tensor's name in a checkpoint (`prefix` is `first_stage_model.`, or empty for a VAE file);
/// `up_blocks` counts the decoder's blocks (they are stored in reverse order).
pub fn vae(prefix: &str, up_blocks: usize, name: &str) -> Option<Source> {
    let (module, param) = split_param(name)?;
    let (side, rest) = module.split_once('.').unwrap_or((module, ""));
    let mapped = match (side, rest) {
        ("quant_conv" | "post_quant_conv", "") => module.to_string(),
        ("encoder" | "decoder", "conv_in" | "conv_out") => module.to_string(),
        ("encoder" | "decoder", "conv_norm_out") => format!("{side}.norm_out"),
        ("encoder" | "decoder", _) => {
            let p: Vec<&str> = rest.split('.').collect();
            let resnet_part = |s: &str| if s == "conv_shortcut" { "nin_shortcut".to_string() } else { s.to_string() };
            match p.as_slice() {
                ["down_blocks", i, "resnets", j, part @ ..] => {
                    format!("{side}.down.{i}.block.{j}.{}", resnet_part(&part.join(".")))
                }
                ["down_blocks", i, "downsamplers", "0", "conv"] => format!("{side}.down.{i}.downsample.conv"),
                ["up_blocks", i, "resnets", j, part @ ..] => {
                    let i = up_blocks.checked_sub(1 + i.parse::<usize>().ok()?)?;
                    format!("{side}.up.{i}.block.{j}.{}", resnet_part(&part.join(".")))
                }
                ["up_blocks", i, "upsamplers", "0", "conv"] => {
                    let i = up_blocks.checked_sub(1 + i.parse::<usize>().ok()?)?;
                    format!("{side}.up.{i}.upsample.conv")
                }
                ["mid_block", "resnets", j, part @ ..] => {
                    format!("{side}.mid.block_{}.{}", j.parse::<usize>().ok()? + 1, resnet_part(&part.join(".")))
                }
                ["mid_block", "attentions", "0", part @ ..] => {
                    let ldm = match part.join(".").as_str() {
                        "group_norm" => "norm",
                        "to_q" | "query" => "q",
                        "to_k" | "key" => "k",
                        "to_v" | "value" => "v",
                        "to_out.0" | "proj_attn" => "proj_out",
                        _ => return None,
                    };
                    format!("{side}.mid.attn_1.{ldm}")
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(Source::Tensor(format!("{prefix}{mapped}.{param}")))
}

/// A CLIP (transformers `CLIPTextModel`) tensor's name in a checkpoint: the same path under `prefix`
/// (`cond_stage_model.transformer.` or `conditioner.embedders.0.transformer.`), always with `text_model.`.
pub fn clip(prefix: &str, name: &str) -> Option<Source> {
    let inner = name.strip_prefix("text_model.").unwrap_or(name);
    Some(Source::Tensor(format!("{prefix}text_model.{inner}")))
}

/// An OpenCLIP text tower tensor's name (`prefix`: `cond_stage_model.model.` for SD 2.x,
/// `conditioner.embedders.1.model.` for SDXL); `width` is the hidden size (q, k and v are stacked rows of
/// `attn.in_proj_weight`).
pub fn open_clip(prefix: &str, width: usize, name: &str) -> Option<Source> {
    let inner = name.strip_prefix("text_model.").unwrap_or(name);
    let t = |s: String| Some(Source::Tensor(format!("{prefix}{s}")));
    match inner {
        "embeddings.token_embedding.weight" => return t("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return t("positional_embedding".into()),
        "final_layer_norm.weight" | "final_layer_norm.bias" => {
            return t(format!("ln_final.{}", after(inner, 1)));
        }
        "text_projection.weight" => return Some(Source::Transposed(format!("{prefix}text_projection"))),
        _ => {}
    }
    let rest = inner.strip_prefix("encoder.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let block = format!("{prefix}transformer.resblocks.{layer}.");
    let (module, param) = split_param(part)?;
    let simple = match module {
        "layer_norm1" => Some("ln_1"),
        "layer_norm2" => Some("ln_2"),
        "mlp.fc1" => Some("mlp.c_fc"),
        "mlp.fc2" => Some("mlp.c_proj"),
        "self_attn.out_proj" => Some("attn.out_proj"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(Source::Tensor(format!("{block}{s}.{param}")));
    }
    let row = match module {
        "self_attn.q_proj" => 0,
        "self_attn.k_proj" => 1,
        "self_attn.v_proj" => 2,
        _ => return None,
    };
    Some(Source::Rows { name: format!("{block}attn.in_proj_{param}"), start: row * width, len: width })
}
