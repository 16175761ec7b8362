//! The result cache (`protocol::cache`): a seeded job that an earlier job already made — same model weights,
//! LoRAs, inputs, parameters, seed, device class and dtype — is answered with copies of that job's images,
//! generating nothing; a job that generates keeps its `completed` event under its key for later ones. The
//! cache lives in the object store, so it holds across workers and queens. Everything here is best effort:
//! a cache that cannot be read or written only means generating.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use super::config::ModelSpec;
use super::effects::{read_completed, store_completed};
use super::generate::JobInputs;
use super::Shared;
use crate::protocol::{self, CacheContext, Completed, JobRequest, PROTOCOL_VERSION};

/// Models' identities (a digest of their files), by model name and the files signature of those files: the
/// last few of each model, so files touched or moved without a change of content keep their identity.
#[derive(Default)]
pub struct Identities(tokio::sync::Mutex<HashMap<String, Vec<(String, String)>>>);

/// The most signatures remembered per model.
const SIGNATURES_KEPT: usize = 4;

impl Identities {
    fn find(known: &HashMap<String, Vec<(String, String)>>, model: &str, signature: &str) -> Option<String> {
        known.get(model)?.iter().find(|(s, _)| s == signature).map(|(_, id)| id.clone())
    }
}

/// Where a job's result is kept in the cache, and the identity of its model's files it names.
pub struct CacheKey {
    /// `cache/<sha256>.msgpack`.
    pub key: String,
    model: String,
    identity: String,
}

/// The cache key of `job` on this worker, with its LoRAs and input pictures as the run takes them; `None`
/// when it may not use the cache (no seed, `cache: false`, a model this worker does not serve) or its
/// model's identity cannot be worked out.
pub async fn key(
    shared: &Arc<Shared>,
    model: &str,
    job: &JobRequest,
    inputs: &JobInputs,
    loras: &[crate::diffusion::LoraWeight],
) -> Option<CacheKey> {
    if !job.cache || job.seed.is_none() {
        return None;
    }
    let spec = shared.config.models.iter().find(|m| m.name == model)?;
    // The model's files are local: as long as they take.
    let identity = identity(shared, spec)
        .await
        .map_err(|e| tracing::warn!(job_id = %job.id, error = %format!("{e:#}"), "no result cache for this job"))
        .ok()?;
    let digest = |bytes: &Option<bytes::Bytes>| bytes.as_ref().map(|b| hex::encode(Sha256::digest(b)));
    let ctx = CacheContext {
        model: identity.clone(),
        // The job's LoRAs come resolved (once, for the run too).
        loras: loras.iter().map(|l| hex::encode(l.lora.hash)).collect(),
        init_image: digest(&inputs.init_image),
        mask: digest(&inputs.mask),
        device: shared.config.device.class().to_string(),
        dtype: format!("{:?}", shared.config.dtype).to_lowercase(),
        numerics: crate::diffusion::numerics::signature(shared.config.device.class()),
    };
    let description = protocol::cache_description(job, &ctx)?;
    let key = protocol::cache_key(&hex::encode(Sha256::digest(description.as_bytes())));
    Some(CacheKey { key, model: spec.name.clone(), identity })
}

/// How long the cache may wait on the store before a job generates instead: with the store slow or down,
/// generating beats waiting (the upload retries on its own).
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The model's identity: a digest of every file it is made of (and of its single-file options), worked out
/// once for the files as they are (the first seeded job reads them through; their files signature, from
/// their metadata at each lookup, tells when they may have changed). An error while the files on disk are
/// not those its last load read (a local model replaced in place, until it loads again): the images it
/// makes then are neither the old identity's nor the new one's.
async fn identity(shared: &Arc<Shared>, spec: &ModelSpec) -> anyhow::Result<String> {
    // Read before the lock, which only the full digest needs: seeded jobs' lookups do not queue behind it.
    let (source, load_options) = (spec.source.clone(), shared.catalogue.options_for(spec));
    let on_disk =
        tokio::task::spawn_blocking(move || crate::generation::files_signature_of(&source, &load_options)).await??;
    let mut known = shared.model_identities.0.lock().await;
    let id = match Identities::find(&known, &spec.name, &on_disk) {
        Some(id) => id,
        None => {
            let (spec_owned, options) = (spec.clone(), shared.catalogue.options().clone());
            let id = tokio::task::spawn_blocking(move || model_identity(&spec_owned, &options)).await??;
            let signatures = known.entry(spec.name.clone()).or_default();
            if signatures.len() >= SIGNATURES_KEPT {
                signatures.remove(0);
            }
            signatures.push((on_disk.clone(), id.clone()));
            id
        }
    };
    // Files touched, copied or moved since the load: the same content is the same model.
    if let Some(loaded) = shared.catalogue.loaded_signature(&spec.name).filter(|loaded| *loaded != on_disk) {
        if Identities::find(&known, &spec.name, &loaded).as_ref() != Some(&id) {
            anyhow::bail!("the model's files changed since it was loaded: no result cache until it is loaded again");
        }
    }
    Ok(id)
}

/// `options`: the catalogue's, so a Hub model is the commit the worker loads (its pins).
fn model_identity(spec: &ModelSpec, options: &crate::generation::ModelOptions) -> anyhow::Result<String> {
    if spec.source.starts_with(crate::generation::RANDOM_PREFIX) {
        return Ok(spec.source.clone());
    }
    let path = Path::new(&spec.source);
    if path.exists() {
        return digest_model(path, None, spec);
    }
    // The commit this worker loads (a branch that moved since is not what it generates with).
    let resolved = crate::generation::resolve_hub(&spec.source, options)?;
    digest_model(&resolved.dir, resolved.entry, spec)
}

/// The digest of a model's files at `dir`, its extra files and options, and the defaults its registry
/// `entry` gives the jobs that leave them out (the key has a job's fields as given: `turbo` and the repo it
/// names run such a job with other steps, guidance and scheduler, so they are two models here).
fn digest_model(dir: &Path, entry: Option<&crate::hub::RegistryEntry>, spec: &ModelSpec) -> anyhow::Result<String> {
    let mut hash = Sha256::new();
    digest_tree(dir, &mut hash)?;
    for extra in [&spec.config, &spec.vae].into_iter().flatten() {
        hash.update(b"\0extra\0");
        digest_tree(extra, &mut hash)?;
    }
    hash.update(spec.prediction_type.as_deref().unwrap_or("").as_bytes());
    if let Some(e) = entry {
        let defaults = (e.width, e.height, e.steps, e.guidance, e.scheduler, e.timestep_spacing);
        hash.update(format!("\0registry defaults\0{defaults:?}").as_bytes());
    }
    Ok(hex::encode(hash.finalize()))
}

/// Every file under `root` (or `root` itself), in name order: its path below `root` and its content.
fn digest_tree(root: &Path, hash: &mut Sha256) -> anyhow::Result<()> {
    let mut files = Vec::new();
    collect(root, &mut files)?;
    files.sort();
    for file in files {
        hash.update(file.strip_prefix(root).unwrap_or(&file).to_string_lossy().as_bytes());
        hash.update(b"\0");
        let mut reader = std::fs::File::open(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hash.update(&buffer[..n]);
        }
    }
    Ok(())
}

fn collect(path: &Path, files: &mut Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    // Followed links: a Hugging Face snapshot is links into its blobs.
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.is_file() {
        files.push(path.to_path_buf());
    } else if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if !entry.file_name().to_string_lossy().starts_with('.') {
                collect(&entry.path(), files)?;
            }
        }
    }
    Ok(())
}

/// The answer to `job` from the cache entry at `key`, its images copied to the job's own keys; `None` on a
/// miss (or a cache that cannot be read: then the job generates).
pub async fn answer(shared: &Shared, key: &str, job: &JobRequest, received_at: u64) -> Option<Completed> {
    let earlier = match tokio::time::timeout(STORE_WAIT, read_completed(shared, key)).await {
        Ok(Ok(earlier)) => earlier?,
        Ok(Err(e)) => {
            tracing::warn!(job_id = %job.id, error = %format!("{e:#}"), "cannot read the result cache; generating");
            return None;
        }
        Err(_) => {
            tracing::warn!(job_id = %job.id, "the store is slow to answer; generating without the result cache");
            return None;
        }
    };
    match copy(shared, &earlier, job, received_at).await {
        Ok(completed) => Some(completed),
        Err(e) => {
            // The earlier job's images may be gone (deleted, expired): generate, and the entry is replaced.
            tracing::info!(job_id = %job.id, error = %format!("{e:#}"), "a cached result cannot be copied; generating");
            None
        }
    }
}

async fn copy(shared: &Shared, earlier: &Completed, job: &JobRequest, received_at: u64) -> anyhow::Result<Completed> {
    let started = std::time::Instant::now();
    let mut images = Vec::with_capacity(earlier.images.len());
    // The entry names the earlier job's images: anything else in the store (an upload, a LoRA) must not be
    // copied out as this job's result.
    if let Some(other) = earlier.foreign_image() {
        anyhow::bail!("the cached result names {:?}, not one of job {}'s images", other.key, earlier.job_id);
    }
    for image in &earlier.images {
        let bytes = shared.store.get(&image.key).await?;
        // A file cut short (a disk that lost it) is a miss: the job is generated, and the entry replaced.
        anyhow::ensure!(
            bytes.len() as u64 == image.bytes,
            "the cached image {:?} is {} bytes, not the {} it was stored with",
            image.key,
            bytes.len(),
            image.bytes
        );
        let ext = image.key.rsplit('.').next().unwrap_or("png");
        let key = protocol::result_key(job.id, image.index, ext);
        shared.store.put(&key, bytes, &image.content_type).await?;
        let url = shared.store.presigned_get(&key, job.expires_at).await;
        images.push(protocol::ImageResult { key, url, ..image.clone() });
    }
    let at = protocol::now_millis();
    let completed = Completed {
        v: PROTOCOL_VERSION,
        job_id: job.id,
        at,
        images,
        timings: protocol::Timings {
            queue_ms: received_at.saturating_sub(job.created_at),
            upload_ms: started.elapsed().as_millis() as u64,
            total_ms: at.saturating_sub(job.created_at),
            ..Default::default()
        },
        warnings: earlier.warnings.clone(),
        cached: true,
    };
    // As after generating: the manifest says every image is stored (a redelivery reports it again).
    store_completed(shared, &protocol::manifest_key(job.id), &completed).await?;
    Ok(completed)
}

/// Keeps `completed` (a job that generated) as the cache entry at `key`.
pub async fn keep(shared: &Shared, key: &CacheKey, completed: &Completed) {
    // The model may have loaded (again) after the key was made: from other files, its images are not the
    // identity's.
    let loaded = shared.catalogue.loaded_signature(&key.model);
    let known = shared.model_identities.0.lock().await;
    let loaded_identity = loaded.and_then(|signature| Identities::find(&known, &key.model, &signature));
    drop(known);
    if loaded_identity.as_ref() != Some(&key.identity) {
        tracing::info!(job_id = %completed.job_id, "the model's files changed as the job ran: not kept in the cache");
        return;
    }
    let entry = Completed { cached: false, ..completed.clone() };
    match tokio::time::timeout(STORE_WAIT, store_completed(shared, &key.key, &entry)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(job_id = %completed.job_id, error = %e, "cannot keep the result in the cache"),
        Err(_) => tracing::warn!(job_id = %completed.job_id, "the store is slow: the result is not kept in the cache"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_name_and_the_repo_it_names_are_two_models_for_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model_index.json"), b"{}").unwrap();
        let spec: ModelSpec = "fast=stabilityai/sdxl-turbo".parse().unwrap();
        let registry = |name| crate::hub::registry_entry(name).unwrap();
        let repo = digest_model(dir.path(), None, &spec).unwrap();
        let turbo = digest_model(dir.path(), Some(registry("turbo")), &spec).unwrap();
        assert_eq!(registry("turbo").repo, "stabilityai/sdxl-turbo");
        assert_ne!(repo, turbo, "the same files, but other defaults for the jobs that leave them out");
        assert_ne!(turbo, digest_model(dir.path(), Some(registry("xl")), &spec).unwrap());
        assert_eq!(turbo, digest_model(dir.path(), Some(registry("turbo")), &spec).unwrap(), "and stable");
        std::fs::write(dir.path().join("model_index.json"), b"{ }").unwrap();
        assert_ne!(repo, digest_model(dir.path(), None, &spec).unwrap(), "the files count");
    }
}
