//! Parsing a `--model` value: a local folder, a built-in short name, or a Hub repo id
//! (`owner/name[@revision]`), with repo ids and revisions validated.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::registry::{registry_entry, registry_names, RegistryEntry};

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
pub(super) fn validate_repo_id(repo: &str) -> std::result::Result<(), String> {
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
pub(super) fn validate_revision(revision: &str) -> std::result::Result<(), String> {
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
