//! Online resolution of a pipeline: its files downloaded pinned to one commit, the cache standing in when the
//! Hub is unreachable.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use hf_hub::Cache;

use super::cache::CachedRepo;
use super::options::HubOptions;
use super::pipeline::resolve_pipeline;
use super::transfer::{HubClient, HubError};

/// Fetches the pipeline's files from the Hub into the cache. `endpoint` overrides the Hub
/// URL (default: `HF_ENDPOINT`, else https://huggingface.co).
pub(super) fn resolve_online(cache: &CachedRepo, opts: &HubOptions, endpoint: Option<&str>) -> Result<PathBuf> {
    let (repo, revision) = (cache.repo.as_str(), cache.revision.as_str());
    let client = HubClient::new(opts, endpoint);

    let info = match client.repo_info(cache) {
        Ok(info) => info,
        // An overloaded or failing Hub (5xx, 429) says nothing of the repo: the cache stands in as for one
        // that cannot be reached, so that a Hub outage does not stop workers whose models are all cached.
        Err(HubError::Http(failure)) if !failure.is_transient() => {
            bail!("{}", failure.explain(repo, revision, None))
        }
        Err(HubError::Http(failure)) => {
            let why = format!(
                "the Hugging Face Hub is failing for {repo} (revision {revision}): {}",
                failure.explain(repo, revision, None)
            );
            return use_cache(cache, opts, &why);
        }
        Err(HubError::Unreachable(err) | HubError::Local(err) | HubError::TooLarge(err)) => {
            let why = format!("cannot reach the Hugging Face Hub for {repo} (revision {revision}): {err}");
            return use_cache(cache, opts, &why);
        }
    };

    // Pin every download to the commit `revision` points to now, so all files land in one
    // snapshot folder even if the branch moves meanwhile.
    let commit = info.sha.clone();
    let listed: HashSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
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
        match client.download(cache, &commit, file, None) {
            Ok(path) => Ok(Some(path)),
            Err(HubError::Http(failure)) => {
                // Listed but gone meanwhile (an fp16 variant, say): the caller falls back.
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
            Err(HubError::Unreachable(err) | HubError::Local(err) | HubError::TooLarge(err)) => {
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

/// Like huggingface_hub: when the Hub cannot answer (`why`), the cache stands in if it has everything.
fn use_cache(cache: &CachedRepo, opts: &HubOptions, why: &str) -> Result<PathBuf> {
    let dir = cache.resolve_unreachable(opts.prefer_fp16).map_err(|missing| {
        anyhow!(
            "{why}; and the cache cannot stand in: {missing}. Check the network (HTTPS_PROXY, HF_ENDPOINT), or pass a local folder"
        )
    })?;
    tracing::warn!("{why}; using the cached copy of {}", cache.repo);
    Ok(dir)
}
