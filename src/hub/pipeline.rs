//! Which files of a diffusers pipeline are fetched: the components `model_index.json` names, and for each
//! its config and the one weight layout to use. [`resolve_pipeline`] is pure over a `fetch(file)` closure,
//! so the online and offline paths (and the tests) share it.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::diffusion::weights::{shard_names, weight_layouts, WeightLayout};

/// Role of a pipeline component, from its name in `model_index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ComponentKind {
    Scheduler,
    Tokenizer,
    TextEncoder,
    DiffusersModel,
}

impl ComponentKind {
    /// Components a Candle SD pipeline uses, by the names the loader reads; others (safety_checker,
    /// feature_extractor, image_encoder, SD3's third text encoder) are not fetched. (A name becomes a folder
    /// in the cache: no other name is one.)
    pub(super) fn of(name: &str) -> Option<Self> {
        match name {
            "scheduler" => Some(Self::Scheduler),
            "unet" | "vae" => Some(Self::DiffusersModel),
            "tokenizer" | "tokenizer_2" => Some(Self::Tokenizer),
            "text_encoder" | "text_encoder_2" => Some(Self::TextEncoder),
            _ => None,
        }
    }
}

/// What to fetch for one component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FilePlan {
    /// Must exist.
    Required(String),
    /// Fetched when the repo has it.
    Optional(String),
    /// The `dir/stem` safetensors weights: the preferred variant (`.fp16.` or plain) as one
    /// file or as shards listed by an index, else the other; an error when none exists.
    Weights { dir: String, stem: &'static str },
    /// `tokenizer.json` if present, else both `vocab.json` and `merges.txt`.
    Tokenizer { dir: String },
}

/// The files to fetch for a component (`name` is its folder), in order.
pub(super) fn component_files(name: &str, kind: ComponentKind) -> Vec<FilePlan> {
    let file = |f: &str| format!("{name}/{f}");
    match kind {
        ComponentKind::Scheduler => vec![FilePlan::Required(file("scheduler_config.json"))],
        ComponentKind::Tokenizer => vec![
            FilePlan::Tokenizer { dir: name.to_string() },
            FilePlan::Optional(file("tokenizer_config.json")),
            FilePlan::Optional(file("special_tokens_map.json")),
        ],
        ComponentKind::TextEncoder => {
            vec![FilePlan::Required(file("config.json")), FilePlan::Weights { dir: name.to_string(), stem: "model" }]
        }
        ComponentKind::DiffusersModel => vec![
            FilePlan::Required(file("config.json")),
            FilePlan::Weights { dir: name.to_string(), stem: "diffusion_pytorch_model" },
        ],
    }
}

/// Fetches a component's weights (see [`crate::diffusion::weights::weight_layouts`]); the fetched paths are appended to
/// `fetched`.
fn fetch_weights(
    fetch: &mut dyn FnMut(&str) -> Result<Option<PathBuf>>,
    missing: &dyn Fn(&str) -> anyhow::Error,
    dir: &str,
    stem: &str,
    prefer_fp16: bool,
    fetched: &mut Vec<PathBuf>,
) -> Result<()> {
    let layouts = weight_layouts(stem, prefer_fp16);
    for layout in &layouts {
        match layout {
            WeightLayout::Single(name) => {
                if let Some(path) = fetch(&format!("{dir}/{name}"))? {
                    fetched.push(path);
                    return Ok(());
                }
            }
            WeightLayout::Sharded(index) => {
                if let Some(index_path) = fetch(&format!("{dir}/{index}"))? {
                    for shard in shard_names(&index_path)? {
                        let file = format!("{dir}/{shard}");
                        fetched.push(fetch(&file)?.ok_or_else(|| missing(&file))?);
                    }
                    fetched.push(index_path);
                    return Ok(());
                }
            }
        }
    }
    let WeightLayout::Single(first) = &layouts[0] else { unreachable!("weight_layouts starts with a single file") };
    Err(missing(&format!("{dir}/{first}")))
}

/// The pipeline components `model_index.json` lists (non-null entries), sorted by name.
pub(super) fn pipeline_components(index: &Value) -> Result<Vec<String>> {
    let map = index.as_object().ok_or_else(|| anyhow!("model_index.json is not a JSON object"))?;
    let mut names: Vec<String> = map
        .iter()
        .filter(|(key, _)| !key.starts_with('_'))
        .filter(|(_, value)| match value.as_array() {
            Some(pair) => pair.len() == 2 && pair.iter().all(|v| !v.is_null()),
            None => false,
        })
        .map(|(key, _)| key.clone())
        .collect();
    names.sort();
    Ok(names)
}

/// Fetches every file a pipeline needs through `fetch` and returns the folder holding
/// `model_index.json`.
///
/// `fetch(file)` returns the local path of a repo file, `Ok(None)` when the repo (or cache)
/// does not have it, or an error (network, permissions). `missing(file)` builds the error for
/// a required file that is absent. This is the whole file-selection logic: online and offline
/// resolution only differ in `fetch` and `missing`.
pub(super) fn resolve_pipeline(
    fetch: &mut dyn FnMut(&str) -> Result<Option<PathBuf>>,
    missing: &dyn Fn(&str) -> anyhow::Error,
    prefer_fp16: bool,
) -> Result<PathBuf> {
    let index_path = fetch("model_index.json")?.ok_or_else(|| missing("model_index.json"))?;
    let root =
        index_path.parent().ok_or_else(|| anyhow!("{} has no parent folder", index_path.display()))?.to_path_buf();
    let index_text =
        std::fs::read_to_string(&index_path).with_context(|| format!("cannot read {}", index_path.display()))?;
    let index: Value =
        serde_json::from_str(&index_text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;

    let mut fetched = vec![index_path.clone()];
    let mut used = 0;
    for name in pipeline_components(&index)? {
        let Some(kind) = ComponentKind::of(&name) else {
            tracing::debug!("not fetching pipeline component {name}: not used");
            continue;
        };
        used += 1;
        for plan in component_files(&name, kind) {
            match plan {
                FilePlan::Required(file) => {
                    fetched.push(fetch(&file)?.ok_or_else(|| missing(&file))?);
                }
                FilePlan::Optional(file) => fetched.extend(fetch(&file)?),
                FilePlan::Weights { dir, stem } => {
                    fetch_weights(fetch, missing, &dir, stem, prefer_fp16, &mut fetched)?;
                }
                FilePlan::Tokenizer { dir } => {
                    if let Some(path) = fetch(&format!("{dir}/tokenizer.json"))? {
                        fetched.push(path);
                    } else {
                        for file in ["vocab.json", "merges.txt"] {
                            let file = format!("{dir}/{file}");
                            fetched.push(fetch(&file)?.ok_or_else(|| missing(&file))?);
                        }
                    }
                }
            }
        }
    }
    if used == 0 {
        bail!(
            "{} lists no unet, vae, text encoder, tokenizer or scheduler: not a Stable Diffusion pipeline",
            index_path.display()
        );
    }
    if let Some(stray) = fetched.iter().find(|p| !p.starts_with(&root)) {
        bail!("{} is not inside the pipeline folder {}", stray.display(), root.display());
    }
    Ok(root)
}
