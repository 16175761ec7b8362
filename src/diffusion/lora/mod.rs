//! LoRAs: reading the files people publish (kohya's `lora_unet_*` / `lora_te*_*` naming, LoCon convolutions,
//! the diffusers/PEFT `lora_A`/`lora_B` layout), finding the layers they adapt ([`names`]) and applying them
//! per job the way diffusers + PEFT do ([`apply`]): `W + scale · alpha/rank · up·down` on every adapted layer,
//! several LoRAs adding up, computed in f32 and stored in the model's dtype.
//!
//! Parsing is strict: a file in another format (LoHa, LoKr, DoRA, …) or with a key that is none of the above
//! is refused with the format or the key named, never loaded in part.

pub mod apply;
pub mod names;

use std::collections::BTreeMap;
use std::fmt;

use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

pub use apply::{Adapters, LoraWeight};

/// The model component a LoRA layer adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        })
    }
}

/// One adapted layer: `up · down` (`[out, rank]` · `[rank, in…]`), weighted by `alpha / rank`.
#[derive(Clone, Debug)]
pub struct LoraLayer {
    pub component: Component,
    /// The layer's path with `_` for `.` (`down_blocks_0_attentions_0_proj_in`), text-encoder paths without
    /// the leading `text_model_`; [`names`] resolves it against the model.
    pub key: String,
    /// The tensor name the layer came from, for messages.
    pub source: String,
    /// `[rank, in]` or `[rank, in, kh, kw]`, as stored (on the CPU, in the file's dtype).
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    pub up: Tensor,
    /// `None`: no alpha stored, which means alpha = rank (a factor of 1).
    pub alpha: Option<f64>,
}

impl LoraLayer {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }
    /// `alpha / rank`.
    pub fn factor(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f64)
    }
}

/// The layout a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// `lora_unet_…` / `lora_te_…` with `lora_down` / `lora_up` / `alpha` (sd-scripts, most published LoRAs).
    Kohya,
    /// `unet.….lora_A.weight` / `lora_B` (diffusers' `save_lora_weights`, PEFT).
    Peft,
}

/// The most layers a LoRA may adapt. SDXL has about 1,300 layers a LoRA or LoCon can adapt (the UNet's
/// linear and convolution layers and both text encoders'); a file naming far more is no real LoRA, and each
/// layer costs memory beyond its tensors.
pub const MAX_LAYERS: usize = 4096;

/// The largest safetensors header a LoRA may have: 3 × [`MAX_LAYERS`] tensors' entries take about 2 MiB.
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// What a parsed layer holds beyond its tensors' data and names (two tensors' shapes, strides and storage
/// handles, the layer itself), counted in [`Lora::bytes`] so that thousands of tiny layers count too.
const LAYER_OVERHEAD_BYTES: usize = 512;

/// A parsed LoRA file.
#[derive(Debug)]
pub struct Lora {
    /// How the LoRA was named (a file or a catalogue name), for messages.
    pub name: String,
    /// SHA-256 of the file.
    pub hash: [u8; 32],
    pub format: LoraFormat,
    pub layers: Vec<LoraLayer>,
    /// Bytes it holds in memory: its tensors (each in its own dtype), their names and each layer's overhead.
    pub bytes: usize,
}

/// Why a LoRA file cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LoraError {
    #[error("{name}: not a readable safetensors file ({reason})")]
    Unreadable { name: String, reason: String },
    #[error("{name}: {format} files are not supported (found `{key}`); sd-rbee applies LoRA and LoCon in the kohya or diffusers/PEFT layout")]
    UnsupportedFormat { name: String, format: &'static str, key: String },
    #[error("{name}: `{key}` is not a LoRA tensor sd-rbee knows (kohya `lora_unet_*`/`lora_te*_*` with lora_down/lora_up/alpha, or diffusers/PEFT `unet.*`/`text_encoder*.*` with lora_A/lora_B)")]
    UnknownKey { name: String, key: String },
    #[error("{name}: {message}")]
    Invalid { name: String, message: String },
    #[error("{name}: {message}")]
    Mismatch { name: String, message: String },
    /// Applying failed on the device (out of memory, ...), not because of the LoRA: worth retrying.
    #[error("applying {name} failed: {message}")]
    Apply { name: String, message: String },
}

impl Lora {
    /// Parses a safetensors LoRA held in `bytes`; `name` appears in every message.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self, LoraError> {
        Self::parse(name, bytes, Sha256::digest(bytes).into())
    }

    /// As [`Lora::from_bytes`], with the SHA-256 of `bytes` already known.
    pub fn parse(name: &str, bytes: &[u8], hash: [u8; 32]) -> Result<Self, LoraError> {
        let unreadable = |reason: String| LoraError::Unreadable { name: name.to_string(), reason };
        // The header is parsed whole (twice): one of a few MiB holds the most tensors a LoRA may have, and a
        // kohya file's training notes.
        let header = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if let Some(header) = header.filter(|&h| h > MAX_HEADER_BYTES) {
            return Err(unreadable(format!("its header is {header} bytes, over the {MAX_HEADER_BYTES} a LoRA needs")));
        }
        let file = SafeTensors::deserialize(bytes).map_err(|e| unreadable(e.to_string()))?;
        let metadata = SafeTensors::read_metadata(bytes).map_err(|e| unreadable(e.to_string()))?.1;
        let peft_alphas = PeftAlphas::from_metadata(metadata.metadata().as_ref())
            .map_err(|message| LoraError::Invalid { name: name.to_string(), message })?;

        if file.len() > 3 * MAX_LAYERS {
            let message = format!("holds {} tensors; a LoRA adapts at most {MAX_LAYERS} layers", file.len());
            return Err(LoraError::Invalid { name: name.to_string(), message });
        }
        let mut keys: Vec<String> = file.names().into_iter().map(str::to_string).collect();
        keys.sort();
        if keys.is_empty() {
            return Err(LoraError::Invalid { name: name.to_string(), message: "holds no tensors".into() });
        }
        if let Some((format, key)) = keys.iter().find_map(|k| refused_format(k).map(|f| (f, k.clone()))) {
            return Err(LoraError::UnsupportedFormat { name: name.to_string(), format, key });
        }

        let mut parts: BTreeMap<(Component, String), Parts> = BTreeMap::new();
        let mut formats = (false, false);
        for key in &keys {
            let Some(classified) = classify(key) else {
                return Err(LoraError::UnknownKey { name: name.to_string(), key: key.clone() });
            };
            match classified.format {
                LoraFormat::Kohya => formats.0 = true,
                LoraFormat::Peft => formats.1 = true,
            }
            let entry = parts.entry((classified.component, classified.layer)).or_default();
            let slot = match classified.role {
                Role::Down => &mut entry.down,
                Role::Up => &mut entry.up,
                Role::Alpha => &mut entry.alpha,
            };
            if let Some(previous) = slot.replace(key.clone()) {
                return Err(LoraError::Invalid {
                    name: name.to_string(),
                    message: format!("`{previous}` and `{key}` are the same tensor of one layer"),
                });
            }
        }
        let format = match formats {
            (true, true) => {
                return Err(LoraError::Invalid {
                    name: name.to_string(),
                    message: "mixes kohya (`lora_unet_*`) and diffusers/PEFT (`unet.*`) keys".into(),
                })
            }
            (true, false) => LoraFormat::Kohya,
            _ => LoraFormat::Peft,
        };

        let invalid = |message: String| LoraError::Invalid { name: name.to_string(), message };
        if parts.len() > MAX_LAYERS {
            return Err(invalid(format!("adapts {} layers; a LoRA adapts at most {MAX_LAYERS}", parts.len())));
        }
        let mut layers = Vec::with_capacity(parts.len());
        let mut held = 0usize;
        for ((component, key), p) in parts {
            let (down_name, up_name) = match (p.down, p.up) {
                (Some(d), Some(u)) => (d, u),
                (None, _) => {
                    return Err(invalid(format!("layer `{key}` of the {component} has no lora_down (lora_A) tensor")))
                }
                (_, None) => {
                    return Err(invalid(format!("layer `{key}` of the {component} has no lora_up (lora_B) tensor")))
                }
            };
            let down = load(&file, &down_name).map_err(&invalid)?;
            let up = load(&file, &up_name).map_err(&invalid)?;
            check_pair(&down_name, &down, &up_name, &up).map_err(&invalid)?;
            let alpha = match &p.alpha {
                Some(a) => Some(scalar(&file, a).map_err(&invalid)?),
                None => peft_alphas.alpha_for(component, &key, down.dims()[0]),
            };
            if let Some(a) = alpha {
                if !a.is_finite() {
                    return Err(invalid(format!("the alpha of `{down_name}` is {a}")));
                }
            }
            held += down.elem_count() * down.dtype().size_in_bytes()
                + up.elem_count() * up.dtype().size_in_bytes()
                + LAYER_OVERHEAD_BYTES
                + key.len()
                + down_name.len();
            layers.push(LoraLayer { component, key, source: down_name, down, up, alpha });
        }
        Ok(Self { name: name.to_string(), hash, format, layers, bytes: held })
    }

    /// The hash as lowercase hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }
}

#[derive(Default)]
struct Parts {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// Formats sd-rbee refuses, recognised by their tensor names.
fn refused_format(key: &str) -> Option<&'static str> {
    const MARKERS: [(&str, &str); 12] = [
        (".hada_w1_a", "LoHa"),
        (".hada_w1_b", "LoHa"),
        (".hada_t1", "LoHa"),
        (".lokr_w1", "LoKr"),
        (".lokr_w2", "LoKr"),
        (".lokr_t2", "LoKr"),
        (".dora_scale", "DoRA"),
        (".lora_magnitude_vector", "DoRA"),
        (".lora_mid.weight", "LoCon with a CP/Tucker middle weight (lora_mid)"),
        (".oft_blocks", "OFT"),
        (".oft_diag", "OFT"),
        (".on_input", "(IA)³"),
    ];
    if let Some((_, f)) = MARKERS.iter().find(|(m, _)| key.contains(m)) {
        return Some(f);
    }
    if key.ends_with(".diff") || key.ends_with(".diff_b") {
        return Some("full weight difference (`.diff`)");
    }
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

struct Classified {
    format: LoraFormat,
    component: Component,
    layer: String,
    role: Role,
}

/// What a tensor name is: which layer of which component, and which of down/up/alpha.
fn classify(key: &str) -> Option<Classified> {
    const KOHYA: [(&str, Component); 4] = [
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
    ];
    for (prefix, component) in KOHYA {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (layer, role) = if let Some(l) = rest.strip_suffix(".lora_down.weight") {
                (l, Role::Down)
            } else if let Some(l) = rest.strip_suffix(".lora_up.weight") {
                (l, Role::Up)
            } else if let Some(l) = rest.strip_suffix(".alpha") {
                (l, Role::Alpha)
            } else {
                return None;
            };
            if layer.is_empty() || layer.contains('.') {
                return None;
            }
            let layer = match component {
                Component::Unet => layer,
                _ => layer.strip_prefix("text_model_").unwrap_or(layer),
            };
            return Some(Classified { format: LoraFormat::Kohya, component, layer: layer.to_string(), role });
        }
    }

    // diffusers / PEFT: `<component>.<module path>.<lora_A|lora_B>.weight`, the older `.lora.down.weight`
    // (LoRACompatible layers) and attention-processor `processor.to_q_lora.down.weight` spellings.
    let (component, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Component::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, r)
    } else if let Some(r) = key.strip_prefix("base_model.model.") {
        (Component::Unet, r)
    } else {
        return None;
    };
    let mut path: String;
    let role;
    if let Some(p) = rest.strip_suffix(".lora_A.weight").or_else(|| rest.strip_suffix(".lora.down.weight")) {
        (path, role) = (p.to_string(), Role::Down);
    } else if let Some(p) = rest.strip_suffix(".lora_B.weight").or_else(|| rest.strip_suffix(".lora.up.weight")) {
        (path, role) = (p.to_string(), Role::Up);
    } else if let Some(p) = rest.strip_suffix(".alpha") {
        (path, role) = (p.to_string(), Role::Alpha);
    } else {
        let (p, role_here) = if let Some(p) = rest.strip_suffix("_lora.down.weight") {
            (p, Role::Down)
        } else if let Some(p) = rest.strip_suffix("_lora.up.weight") {
            (p, Role::Up)
        } else {
            return None;
        };
        let (module, proj) = p.rsplit_once(".processor.")?;
        let proj = match proj {
            "to_q" | "to_k" | "to_v" => proj.to_string(),
            "to_out" => "to_out.0".to_string(),
            _ => return None,
        };
        (path, role) = (format!("{module}.{proj}"), role_here);
    }
    if component != Component::Unet {
        if let Some(p) = path.strip_prefix("text_model.") {
            path = p.to_string();
        }
    }
    if path.is_empty() || path.split('.').any(str::is_empty) {
        return None;
    }
    Some(Classified { format: LoraFormat::Peft, component, layer: path.replace('.', "_"), role })
}

/// The alphas a diffusers file records in its `lora_adapter_metadata` (per component: `lora_alpha`,
/// `alpha_pattern`, `use_rslora`); without them alpha equals the rank.
#[derive(Default)]
struct PeftAlphas(BTreeMap<Component, PeftConfig>);

#[derive(Default)]
struct PeftConfig {
    alpha: Option<f64>,
    /// `(module name in `_` form, the same as a suffix: `_` before it, alpha)`.
    pattern: Vec<(String, String, f64)>,
    /// rsLoRA: the factor is alpha / √rank instead of alpha / rank.
    rslora: bool,
}

impl PeftAlphas {
    /// The alphas of `metadata`; an error when its `alpha_pattern` names more modules than a LoRA adapts
    /// (each layer is looked up in it).
    fn from_metadata(metadata: Option<&std::collections::HashMap<String, String>>) -> Result<Self, String> {
        let mut out = Self::default();
        let Some(json) = metadata.and_then(|m| m.get("lora_adapter_metadata")) else { return Ok(out) };
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) else {
            return Ok(out);
        };
        for component in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
            let get = |key: &str| map.get(&format!("{component}.{key}"));
            let patterns = get("alpha_pattern").and_then(serde_json::Value::as_object);
            if let Some(count) = patterns.map(serde_json::Map::len).filter(|&n| n > MAX_LAYERS) {
                return Err(format!(
                    "its {component}.alpha_pattern names {count} modules; a LoRA adapts at most {MAX_LAYERS}"
                ));
            }
            let pattern = patterns
                .map(|p| {
                    let entry = |(k, v): (&String, &serde_json::Value)| {
                        let module = k.replace('.', "_");
                        Some((format!("_{module}"), module, v.as_f64()?))
                    };
                    p.iter().filter_map(entry).collect()
                })
                .unwrap_or_default();
            out.0.insert(
                component,
                PeftConfig {
                    alpha: get("lora_alpha").and_then(serde_json::Value::as_f64),
                    pattern,
                    rslora: get("use_rslora").and_then(serde_json::Value::as_bool).unwrap_or(false),
                },
            );
        }
        Ok(out)
    }

    /// The alpha that gives `layer` (of `rank`) its factor as `alpha / rank`.
    fn alpha_for(&self, component: Component, layer: &str, rank: usize) -> Option<f64> {
        let c = self.0.get(&component)?;
        let alpha = c.pattern.iter().find(|(suffix, p, _)| layer == p || layer.ends_with(suffix.as_str())).map(|e| e.2);
        let alpha = alpha.or(c.alpha)?;
        Some(if c.rslora { alpha * (rank as f64).sqrt() } else { alpha })
    }
}

fn load(file: &SafeTensors, name: &str) -> Result<Tensor, String> {
    let view = file.tensor(name).map_err(|e| format!("`{name}`: {e}"))?;
    let dtype = match view.dtype() {
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        other => return Err(format!("`{name}` is {other:?}, expected a float tensor")),
    };
    let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
        .map_err(|e| format!("`{name}`: {e}"))?;
    let finite = tensor
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(|e| format!("`{name}`: {e}"))?
        .iter()
        .all(|v| v.is_finite());
    if !finite {
        return Err(format!("`{name}` holds NaN or infinite values"));
    }
    Ok(tensor)
}

fn scalar(file: &SafeTensors, name: &str) -> Result<f64, String> {
    let t = load(file, name)?;
    if t.elem_count() != 1 {
        return Err(format!("`{name}` has shape {:?}, expected one value", t.dims()));
    }
    t.to_dtype(DType::F64).and_then(|t| t.flatten_all()?.to_vec1::<f64>()).map(|v| v[0]).map_err(|e| e.to_string())
}

/// `down` is `[rank, in]` or `[rank, in, kh, kw]`, `up` `[out, rank]` or `[out, rank, 1, 1]`, ranks equal.
fn check_pair(down_name: &str, down: &Tensor, up_name: &str, up: &Tensor) -> Result<(), String> {
    let (d, u) = (down.dims(), up.dims());
    if !(d.len() == 2 || d.len() == 4) || d[0] == 0 || d.contains(&0) {
        return Err(format!("`{down_name}` has shape {d:?}, expected [rank, in] or [rank, in, kh, kw]"));
    }
    if !(u.len() == 2 || (u.len() == 4 && u[2] == 1 && u[3] == 1)) || u.contains(&0) {
        return Err(format!("`{up_name}` has shape {u:?}, expected [out, rank] or [out, rank, 1, 1]"));
    }
    if u[1] != d[0] {
        return Err(format!("`{down_name}` has rank {} but `{up_name}` has rank {}", d[0], u[1]));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
