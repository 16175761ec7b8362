//! Talking to the Hub: its HTTP failures in words, the client, the repo info request, and online
//! resolution (downloads pinned to one commit, the cache standing in when the Hub is unreachable).

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::RepoInfo;
use hf_hub::Cache;

use super::cache::CachedRepo;
use super::options::HubOptions;
use super::pipeline::resolve_pipeline;

/// An HTTP error answer from the Hub.
pub(super) struct HttpFailure {
    pub(super) status: u16,
    pub(super) error_code: Option<String>,
    pub(super) message: Option<String>,
}

impl HttpFailure {
    /// Why the Hub refused, in words, for `repo` at `revision` (and `file` when downloading).
    pub(super) fn explain(&self, repo: &str, revision: &str, file: Option<&str>) -> String {
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
pub(super) fn hub_api(cache: &CachedRepo, opts: &HubOptions, endpoint: Option<&str>) -> Result<Api> {
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
pub(super) fn resolve_online(cache: &CachedRepo, opts: &HubOptions, endpoint: Option<&str>) -> Result<PathBuf> {
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

pub(super) enum RepoInfoError {
    /// The Hub answered with an error status.
    Http(HttpFailure),
    /// No answer (network, TLS, proxy) or an unreadable one.
    Other(String),
}

/// The repo's commit and file list at the revision (`GET /api/models/<repo>/revision/<rev>`).
pub(super) fn repo_info(api: &Api, cache: &CachedRepo) -> std::result::Result<RepoInfo, RepoInfoError> {
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
