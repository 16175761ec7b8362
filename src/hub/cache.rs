//! One repo revision in the hf-hub cache ([`CachedRepo`]): finding its files, naming what is
//! missing, and resolving a pipeline from the cache alone.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use hf_hub::{Cache, Repo, RepoType};

use super::pipeline::resolve_pipeline;

/// One repo revision in the hf-hub cache (`<cache>/models--owner--name/`).
pub(super) struct CachedRepo {
    pub(super) cache_root: PathBuf,
    pub(super) repo: String,
    pub(super) revision: String,
}

impl CachedRepo {
    pub(super) fn new(cache_root: PathBuf, repo: &str, revision: &str) -> Self {
        Self { cache_root, repo: repo.to_string(), revision: revision.to_string() }
    }

    pub(super) fn hf_repo(&self, revision: &str) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, revision.to_string())
    }

    /// `<cache>/models--owner--name`.
    pub(super) fn repo_dir(&self) -> PathBuf {
        self.cache_root.join(self.hf_repo(&self.revision).folder_name())
    }

    /// The commit the revision points to in the cache: `refs/<revision>`, or the revision
    /// itself when it is a commit hash with a snapshot folder (as `huggingface_hub` leaves it).
    pub(super) fn commit(&self) -> Option<String> {
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
    pub(super) fn get(&self, file: &str) -> Option<PathBuf> {
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
    pub(super) fn offline_missing(&self, file: &str) -> anyhow::Error {
        anyhow!(
            "offline mode: {}; run once without --offline / HF_HUB_OFFLINE to download it, or pass a local folder",
            self.missing(file)
        )
    }

    /// Resolves the pipeline from the cache alone.
    pub(super) fn resolve(&self, prefer_fp16: bool) -> Result<PathBuf> {
        resolve_pipeline(&mut |file| Ok(self.get(file)), &|file| self.offline_missing(file), prefer_fp16)
    }

    /// Resolves the pipeline from the cache alone, standing in for an unreachable Hub.
    pub(super) fn resolve_unreachable(&self, prefer_fp16: bool) -> Result<PathBuf> {
        resolve_pipeline(&mut |file| Ok(self.get(file)), &|file| anyhow!("{}", self.missing(file)), prefer_fp16)
    }
}
