//! Resolving a model to a pipeline folder: a local folder, or a Hub repo's cache snapshot (offline from the
//! cache, online through `online.rs`).

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::cache::CachedRepo;
use super::model_ref::{parse_model_ref, ModelRef};
use super::online::resolve_online;
use super::options::HubOptions;
use super::registry::RegistryEntry;

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

/// Models resolved once per process ([`Pins::resolve`]): a worker loads a model again after evicting it,
/// sizes it before, and describes it to its result cache, and all of these must be the same commit's weights
/// even if the repo's branch moves meanwhile (that is picked up at the next start). It also asks the Hub
/// once per model, not at each of those.
#[derive(Debug, Default)]
pub struct Pins(parking_lot::Mutex<std::collections::HashMap<(String, bool), ResolvedModel>>);

impl Pins {
    /// [`resolve()`] the first time `model` is asked for (with `opts`' weight variant); what it gave after,
    /// while its folder is still there.
    pub fn resolve(&self, model: &str, opts: &HubOptions) -> Result<ResolvedModel> {
        let key = (model.to_string(), opts.prefer_fp16);
        let pinned = self.0.lock().get(&key).cloned();
        if let Some(pinned) = pinned.filter(|p| p.dir.join("model_index.json").is_file()) {
            return Ok(pinned);
        }
        let resolved = resolve(model, opts)?;
        self.0.lock().insert(key, resolved.clone());
        Ok(resolved)
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
