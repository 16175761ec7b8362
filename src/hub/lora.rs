//! LoRAs on the Hugging Face Hub: `owner/name[/FILE.safetensors][@revision]`. Without a file, the repo's
//! `pytorch_lora_weights.safetensors` (what diffusers' `save_lora_weights` writes), else its only `.safetensors`
//! at the top level; several are an error that lists them. Downloads go into the Hugging Face cache, pinned to
//! the commit the revision points to; offline, or when the Hub cannot be reached, the cache answers alone.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use hf_hub::Cache;

use super::cache::CachedRepo;
use super::model_ref::{validate_repo_id, validate_revision};
use super::options::HubOptions;
use super::transfer::{HubClient, HubError};

/// The file diffusers' `save_lora_weights` writes.
const DIFFUSERS_LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// A LoRA named on the Hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubLora {
    pub repo: String,
    pub file: Option<String>,
    pub revision: String,
}

impl std::fmt::Display for HubLora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.repo)?;
        if let Some(file) = &self.file {
            write!(f, "/{file}")?;
        }
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        Ok(())
    }
}

/// Parses `owner/name[/FILE.safetensors][@revision]`: a repo id as the Hub allows it, and one file name of
/// letters, digits, `-`, `_`, `.` ending in `.safetensors` (never a path: no further `/`, no `..`).
pub fn parse(text: &str) -> std::result::Result<HubLora, String> {
    let (path, revision) = match text.split_once('@') {
        Some((p, r)) => (p, r),
        None => (text, "main"),
    };
    validate_revision(revision)?;
    let parts: Vec<&str> = path.split('/').collect();
    let (repo, file) = match parts[..] {
        [owner, name] => (format!("{owner}/{name}"), None),
        [owner, name, file] => (format!("{owner}/{name}"), Some(file.to_string())),
        _ => return Err(format!("{text:?} is not owner/name or owner/name/FILE.safetensors")),
    };
    validate_repo_id(&repo)?;
    if let Some(f) = &file {
        let ok = f.ends_with(".safetensors")
            && !f.starts_with('.')
            && !f.contains("..")
            && f.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(format!("{text:?}: the file must be a plain FILE.safetensors name"));
        }
    }
    Ok(HubLora { repo, file, revision: revision.to_string() })
}

/// Why a Hub LoRA is not there.
#[derive(Debug, thiserror::Error)]
pub enum HubLoraError {
    /// The Hub (or the cache, offline) says it does not exist or is not one LoRA file: asking again won't help.
    #[error("{0:#}")]
    Refused(anyhow::Error),
    /// The Hub cannot be reached or failed (5xx, 429, a broken download): worth retrying.
    #[error("{0:#}")]
    Unreachable(anyhow::Error),
}

/// A LoRA file found.
#[derive(Debug)]
pub struct ResolvedLora {
    /// In the cache's snapshot of the repo.
    pub path: PathBuf,
    /// The Hub answered for it (so it can be downloaded again if deleted); false offline, or when the Hub
    /// could not be reached and the cache answered alone.
    pub hub_answered: bool,
    /// This call downloaded its content (the cache had it under no commit).
    pub fetched: bool,
}

/// The LoRA file, downloading it unless `opts.offline`; a file over `max_bytes` is refused before any of it
/// is downloaded.
pub fn resolve(lora: &HubLora, opts: &HubOptions, max_bytes: u64) -> std::result::Result<ResolvedLora, HubLoraError> {
    resolve_at(lora, opts, None, max_bytes)
}

fn resolve_at(
    lora: &HubLora,
    opts: &HubOptions,
    endpoint: Option<&str>,
    max_bytes: u64,
) -> std::result::Result<ResolvedLora, HubLoraError> {
    let cache = CachedRepo::new(opts.cache_root(), &lora.repo, &lora.revision);
    fetch(lora, opts, endpoint, max_bytes, &cache)
}

/// Marks `resolved` as used just now, then deletes the least recently used Hub LoRAs of the cache until
/// they take at most `max_bytes` (see [`super::lora_cache`]), sparing this one. Nothing is deleted unless the
/// Hub answered: a LoRA deleted offline could not come back.
pub fn used(opts: &HubOptions, resolved: &ResolvedLora, max_bytes: u64) -> super::lora_cache::Trimmed {
    super::lora_cache::record_use(&resolved.path);
    if !resolved.hub_answered {
        return Default::default();
    }
    super::lora_cache::trim(&opts.cache_root(), max_bytes, Some(&resolved.path), super::lora_cache::IN_USE_GRACE)
}

/// For a file downloaded for a LoRA that is none (a VAE, a text encoder, anything that does not parse as
/// one): marks it as used at the epoch, so that it counts under the bound and is the first to go, then trims
/// the cache to `max_bytes` (when given). Without it, such a file stays for good: only what is marked is ever
/// deleted, and each job naming another one would leave up to `--max-lora-bytes` behind. A file that was in
/// the cache before is left alone: it may be a model's.
pub fn refused(opts: &HubOptions, resolved: &ResolvedLora, max_bytes: Option<u64>) -> super::lora_cache::Trimmed {
    if !resolved.fetched {
        return Default::default();
    }
    super::lora_cache::record_use_at(&resolved.path, std::time::SystemTime::UNIX_EPOCH);
    match max_bytes {
        Some(max) => super::lora_cache::trim(&opts.cache_root(), max, None, super::lora_cache::IN_USE_GRACE),
        None => Default::default(),
    }
}

/// The LoRA file, from the cache or the Hub.
fn fetch(
    lora: &HubLora,
    opts: &HubOptions,
    endpoint: Option<&str>,
    max_bytes: u64,
    cache: &CachedRepo,
) -> std::result::Result<ResolvedLora, HubLoraError> {
    use HubLoraError::{Refused, Unreachable};
    let from_cache = |path| ResolvedLora { path, hub_answered: false, fetched: false };
    if opts.offline {
        return cached(cache, lora).map(from_cache).map_err(Refused);
    }
    let client = HubClient::new(opts, endpoint);
    let info = match client.repo_info(cache) {
        Ok(info) => info,
        Err(HubError::Http(failure)) => {
            let e = anyhow!("LoRA {lora}: {}", failure.explain(&lora.repo, &lora.revision, lora.file.as_deref()));
            return Err(if failure.is_transient() { Unreachable(e) } else { Refused(e) });
        }
        Err(HubError::Unreachable(err) | HubError::Local(err) | HubError::TooLarge(err)) => {
            return cached(cache, lora).map(from_cache).map_err(|missing| {
                Unreachable(anyhow!("cannot reach the Hugging Face Hub for LoRA {lora} ({err}), and {missing:#}"))
            });
        }
    };
    let listed: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let file = choose(lora, &listed).map_err(Refused)?;
    let (path, fetched) = client.download_noting(cache, &info.sha, &file, Some(max_bytes)).map_err(|e| {
        let failed = |why: String| anyhow!("downloading {file} of LoRA {lora} failed: {why}");
        match e {
            HubError::Http(f) if !f.is_transient() => {
                Refused(failed(f.explain(&lora.repo, &lora.revision, Some(&file))))
            }
            HubError::Http(f) => Unreachable(failed(f.explain(&lora.repo, &lora.revision, Some(&file)))),
            HubError::Unreachable(why) | HubError::Local(why) => Unreachable(failed(why)),
            HubError::TooLarge(why) => Refused(anyhow!("LoRA {lora}: {why} bytes (--max-lora-bytes)")),
        }
    })?;
    if lora.revision != info.sha {
        let record = Cache::new(cache.cache_root.clone()).repo(cache.hf_repo(&lora.revision)).create_ref(&info.sha);
        if let Err(err) = record {
            tracing::warn!("cannot record {}@{} in the cache: {err}", lora.repo, lora.revision);
        }
    }
    Ok(ResolvedLora { path, hub_answered: true, fetched })
}

/// Which file of the repo is the LoRA.
fn choose(lora: &HubLora, listed: &[String]) -> Result<String> {
    if let Some(file) = &lora.file {
        return match listed.iter().any(|f| f == file) {
            true => Ok(file.clone()),
            false => bail!("LoRA {lora}: the repo has no {file}"),
        };
    }
    if listed.iter().any(|f| f == DIFFUSERS_LORA_FILE) {
        return Ok(DIFFUSERS_LORA_FILE.to_string());
    }
    let top: Vec<&String> = listed.iter().filter(|f| f.ends_with(".safetensors") && !f.contains('/')).collect();
    match top[..] {
        [one] => Ok(one.clone()),
        [] => bail!("LoRA {lora}: the repo has no .safetensors file at its top level"),
        _ => bail!(
            "LoRA {lora}: the repo has {} .safetensors files; name one as {}/FILE.safetensors (e.g. {})",
            top.len(),
            lora.repo,
            top.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The LoRA from the cache alone.
fn cached(cache: &CachedRepo, lora: &HubLora) -> Result<PathBuf> {
    let offline = |file: &str| cache.offline_missing(file);
    if let Some(file) = &lora.file {
        return cache.get(file).ok_or_else(|| offline(file));
    }
    if let Some(path) = cache.get(DIFFUSERS_LORA_FILE) {
        return Ok(path);
    }
    let snapshot = cache.commit().map(|c| cache.repo_dir().join("snapshots").join(c));
    let found: Vec<PathBuf> = snapshot
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    match &found[..] {
        [one] => Ok(one.clone()),
        _ => Err(offline(DIFFUSERS_LORA_FILE)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{FakeCache, MockHub, COMMIT};
    use super::*;

    /// A size limit no test file reaches.
    const MAX: u64 = 1 << 30;

    #[test]
    fn references_are_repo_ids_and_plain_file_names() {
        let r = parse("owner/my-lora").unwrap();
        assert_eq!((r.repo.as_str(), r.file.as_deref(), r.revision.as_str()), ("owner/my-lora", None, "main"));
        let r = parse("owner/my-lora/style_v2.safetensors@v1").unwrap();
        assert_eq!((r.file.as_deref(), r.revision.as_str()), (Some("style_v2.safetensors"), "v1"));
        assert_eq!(r.to_string(), "owner/my-lora/style_v2.safetensors@v1");
        for bad in
            ["style", "a/b/c/d.safetensors", "a/b/../x.safetensors", "a/b/x.ckpt", "a/../b", "a/b/.x.safetensors"]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_lora_is_downloaded_into_the_cache_and_found_there_offline() {
        let repo = "owner/online-lora";
        let hub = MockHub::start(repo, vec![(DIFFUSERS_LORA_FILE, "lora".into()), ("README.md", "x".into())], vec![]);
        let cache = FakeCache::new();
        let online = HubOptions { offline: false, ..cache.options(false) };
        let lora = parse(repo).unwrap();
        // A download that goes silent is a failure worth retrying (the job is tried again), not a hang.
        hub.silence_downloads(usize::MAX, 2);
        let quick = HubOptions { download_timeout: std::time::Duration::from_millis(100), ..online.clone() };
        match resolve_at(&lora, &quick, Some(&hub.url), MAX) {
            Err(HubLoraError::Unreachable(e)) => assert!(format!("{e:#}").contains("received nothing"), "{e:#}"),
            other => panic!("{other:?}"),
        }
        hub.silence_downloads(0, 0);
        let found = resolve_at(&lora, &online, Some(&hub.url), MAX).unwrap();
        let path = found.path;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "lora");
        assert!(path.starts_with(cache.repo_dir(repo).join("snapshots").join(COMMIT)), "{}", path.display());
        assert!(found.hub_answered);
        // Offline, the cache alone answers.
        let offline = resolve_at(&lora, &cache.options(false), None, MAX).unwrap();
        assert_eq!((offline.path, offline.hub_answered), (path, false));
        // A file the repo does not have is named.
        let err = resolve_at(&parse(&format!("{repo}/other.safetensors")).unwrap(), &online, Some(&hub.url), MAX)
            .unwrap_err();
        assert!(err.to_string().contains("has no other.safetensors"), "{err}");
    }

    #[test]
    fn a_lora_over_the_size_limit_is_refused_before_it_is_downloaded() {
        let repo = "owner/huge-lora";
        let hub = MockHub::start(repo, vec![(DIFFUSERS_LORA_FILE, "0123456789".into())], vec![]);
        let cache = FakeCache::new();
        let online = HubOptions { offline: false, ..cache.options(false) };
        match resolve_at(&parse(repo).unwrap(), &online, Some(&hub.url), 9) {
            Err(HubLoraError::Refused(e)) => {
                let e = format!("{e:#}");
                assert!(e.contains("is 10 bytes, over the limit of 9") && e.contains("--max-lora-bytes"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let blobs = cache.repo_dir(repo).join("blobs");
        let kept = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
        assert_eq!(kept, 0, "nothing of it was downloaded into {}", blobs.display());
        assert!(resolve_at(&parse(repo).unwrap(), &online, Some(&hub.url), 10).is_ok(), "at the limit it is taken");
    }

    #[test]
    fn past_the_disk_bound_the_least_recently_used_lora_is_deleted_and_fetched_again_when_named() {
        let (a, b) = ("owner/lora-a", "owner/lora-b");
        let hub_a = MockHub::start(a, vec![(DIFFUSERS_LORA_FILE, "aaaaaaaaaa".into())], vec![]);
        let hub_b = MockHub::start(b, vec![(DIFFUSERS_LORA_FILE, "bbbbbbbbbb".into())], vec![]);
        let cache = FakeCache::new();
        let online = HubOptions { offline: false, ..cache.options(false) };
        let found_a = resolve_at(&parse(a).unwrap(), &online, Some(&hub_a.url), MAX).unwrap();
        assert_eq!(used(&online, &found_a, 15), super::super::lora_cache::Trimmed { deleted: vec![], kept_bytes: 10 });
        // Used an hour ago, out of the grace.
        let mark = cache.repo_dir(a).join(".sd-rbee-loras").join(COMMIT).join(DIFFUSERS_LORA_FILE);
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::OpenOptions::new().write(true).open(&mark).unwrap().set_modified(hour_ago).unwrap();
        // Found in the cache alone (offline, or the Hub unreachable), nothing goes: it could not come back.
        let found_b = resolve_at(&parse(b).unwrap(), &online, Some(&hub_b.url), MAX).unwrap();
        let cached_b = ResolvedLora { path: found_b.path.clone(), hub_answered: false, fetched: false };
        assert_eq!(used(&online, &cached_b, 15).deleted.len(), 0);
        assert!(found_a.path.exists());
        let trimmed = used(&online, &found_b, 15);
        assert_eq!((trimmed.deleted.len(), trimmed.kept_bytes), (1, 10), "{trimmed:?}");
        assert!(!found_a.path.exists() && found_b.path.exists());
        // Named again, it is downloaded again, to the same place.
        let again = resolve_at(&parse(a).unwrap(), &online, Some(&hub_a.url), MAX).unwrap().path;
        assert_eq!((&again, std::fs::read_to_string(&again).unwrap().as_str()), (&found_a.path, "aaaaaaaaaa"));
        // A link left dangling (a download racing a deletion in another process) does not stop the next one.
        std::fs::remove_file(std::fs::canonicalize(&again).unwrap()).unwrap();
        assert!(again.symlink_metadata().is_ok() && !again.exists());
        let again = resolve_at(&parse(a).unwrap(), &online, Some(&hub_a.url), MAX).unwrap().path;
        assert_eq!(std::fs::read_to_string(&again).unwrap(), "aaaaaaaaaa");
    }

    #[test]
    fn a_file_downloaded_for_a_lora_that_is_none_counts_under_the_bound_and_goes_first() {
        let (a, junk) = ("owner/lora-a", "owner/not-a-lora");
        let hub_a = MockHub::start(a, vec![(DIFFUSERS_LORA_FILE, "aaaaaaaaaa".into())], vec![]);
        let hub_junk = MockHub::start(junk, vec![("vae.safetensors", "jjjjjjjjjjjj".into())], vec![]);
        let cache = FakeCache::new();
        let online = HubOptions { offline: false, ..cache.options(false) };
        let found_a = resolve_at(&parse(a).unwrap(), &online, Some(&hub_a.url), MAX).unwrap();
        assert!(found_a.fetched);
        used(&online, &found_a, 100);
        // Used an hour ago, out of the grace: only the order spares it below.
        let mark = cache.repo_dir(a).join(".sd-rbee-loras").join(COMMIT).join(DIFFUSERS_LORA_FILE);
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::OpenOptions::new().write(true).open(&mark).unwrap().set_modified(hour_ago).unwrap();
        let lora = parse(&format!("{junk}/vae.safetensors")).unwrap();
        let found = resolve_at(&lora, &online, Some(&hub_junk.url), MAX).unwrap();
        assert!(found.fetched && found.path.exists());
        // Within the bound it stays (named again, it is refused without a download) and is counted.
        assert_eq!(refused(&online, &found, Some(100)).kept_bytes, 22);
        let again = resolve_at(&lora, &online, Some(&hub_junk.url), MAX).unwrap();
        assert!(!again.fetched);
        assert_eq!(refused(&online, &again, Some(100)), Default::default(), "found in the cache: not marked again");
        // Past the bound it goes first, although it was fetched just now; the LoRA used an hour ago stays.
        let trimmed = refused(&online, &found, Some(15));
        assert_eq!((trimmed.deleted.len(), trimmed.kept_bytes), (1, 10), "{trimmed:?}");
        assert!(!found.path.exists() && found_a.path.exists());
        let blobs = std::fs::read_dir(cache.repo_dir(junk).join("blobs")).unwrap().flatten();
        let kept: Vec<_> = blobs.map(|e| e.path()).filter(|p| p.extension().is_none_or(|e| e != "lock")).collect();
        assert!(kept.is_empty(), "its blob is gone (its empty lock file may stay): {kept:?}");
    }

    #[test]
    fn without_a_file_name_the_only_safetensors_is_taken_and_several_are_listed() {
        let lora = |repo: &str| HubLora { repo: repo.into(), file: None, revision: "main".into() };
        let listed = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(choose(&lora("a/b"), &listed(&["x.safetensors", "sub/y.safetensors"])).unwrap(), "x.safetensors");
        let err = choose(&lora("a/b"), &listed(&["x.safetensors", "y.safetensors"])).unwrap_err().to_string();
        assert!(err.contains("a/b/FILE.safetensors") && err.contains("x.safetensors, y.safetensors"), "{err}");
        assert!(choose(&lora("a/b"), &listed(&["x.ckpt"])).is_err());

        let cache = FakeCache::new();
        cache.add("o/only", COMMIT, "style.safetensors", "s");
        cache.set_ref("o/only", "main", COMMIT);
        let path = resolve_at(&parse("o/only").unwrap(), &cache.options(false), None, MAX).unwrap().path;
        assert_eq!(std::fs::read_to_string(path).unwrap(), "s");
        let err = resolve_at(&parse("o/missing").unwrap(), &cache.options(false), None, MAX).unwrap_err();
        assert!(err.to_string().contains("offline"), "{err}");
    }
}
