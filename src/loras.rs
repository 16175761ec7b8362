//! Where LoRAs come from and how many a job may use: files named on the command line, and catalogue names
//! that a worker resolves in its `--lora-dir`, then under `--lora-store-prefix` in its object store (a job on
//! the bus names a LoRA, it never points at a file or URL). Parsed LoRAs are cached by content hash, so a LoRA
//! used by many jobs is read and parsed once (a stored one is checked with a HEAD, not downloaded again), and
//! the same file under two names is held once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long listing the store's LoRAs may take (a heartbeat waits on it).
const LISTING_PATIENCE: Duration = Duration::from_secs(3);

use parking_lot::Mutex;

use crate::diffusion::lora::Lora;
use crate::diffusion::LoraWeight;
use crate::protocol::MAX_LORA_SCALE;

/// Limits on LoRAs; configuration like the job limits.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraLimits {
    /// LoRAs in one job. Default 8.
    pub max_per_job: usize,
    /// Size of one LoRA file. Default 2 GiB.
    pub max_file_bytes: u64,
    /// Parsed LoRAs kept in memory, in bytes; the least recently used go first. Default 4 GiB.
    pub max_cached_bytes: usize,
    /// Memory the parsed LoRAs of one job may take together. Default 4 GiB (what the cache of parsed LoRAs
    /// holds).
    pub max_job_bytes: u64,
    /// Disk the LoRAs fetched from the Hub may take in the Hugging Face cache; the least recently used are
    /// deleted past it. Default none (`generate` leaves the cache alone); a worker's `--lora-hub-cache` is
    /// 10 GiB unless set.
    pub max_hub_cache_bytes: Option<u64>,
}

impl Default for LoraLimits {
    fn default() -> Self {
        Self {
            max_per_job: 8,
            max_file_bytes: 2 << 30,
            max_cached_bytes: 4 << 30,
            max_job_bytes: 4 << 30,
            max_hub_cache_bytes: None,
        }
    }
}

/// Why a LoRA could not be provided. The message names the LoRA; [`JobLoraError`] adds the job field.
#[derive(Debug, thiserror::Error)]
pub enum LoraSourceError {
    #[error("{0}")]
    Invalid(String),
    /// The object store holding it cannot be reached now: worth retrying.
    #[error("{0}")]
    Unavailable(String),
    /// The Hub cannot be reached now, or reading it failed in a way a retry may not see again.
    #[error("{0}")]
    NotReadNow(String),
    #[error(transparent)]
    Lora(#[from] crate::diffusion::lora::LoraError),
}

/// A job's LoRA that cannot be provided, with the job field it is about: `loras[i].name` or
/// `loras[i].scale` for one LoRA, `loras` for the set (how many, how much memory together).
#[derive(Debug)]
pub struct JobLoraError {
    pub field: String,
    pub error: LoraSourceError,
}

/// A LoRA's file identity: when it changes, the file is read again.
#[derive(Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

#[derive(Default)]
struct Cache {
    /// Path → its stamp and content hash when last read.
    files: HashMap<PathBuf, (FileStamp, [u8; 32])>,
    /// Content hash → the parsed LoRA and a use counter for LRU eviction.
    parsed: HashMap<[u8; 32], (Arc<Lora>, u64)>,
    /// Store key → its stamp (size, version) and content hash when last read.
    objects: HashMap<String, ((u64, String), [u8; 32])>,
    /// Files and objects that did not parse as a LoRA, with the stamp they had and why: named again, they
    /// are refused at once, not read, hashed and parsed again (a few seconds a file, while others wait).
    refused_files: HashMap<PathBuf, (FileStamp, String)>,
    refused_objects: HashMap<String, ((u64, String), String)>,
    /// Every parsed LoRA still alive, in the cache or in a job's hands, with its size: what they take
    /// together is bounded ([`LoraLibrary::wait_for_room`]).
    live: HashMap<[u8; 32], (std::sync::Weak<Lora>, usize)>,
    clock: u64,
}

/// The most refusals remembered (each kind): past it they are forgotten, all at once.
const MAX_REFUSALS: usize = 1024;

/// Remembers why what `key` named, as it was at `stamp`, is no LoRA.
fn remember<K: std::hash::Hash + Eq, S>(
    refusals: &mut HashMap<K, (S, String)>,
    key: K,
    stamp: S,
    why: &LoraSourceError,
) {
    if refusals.len() >= MAX_REFUSALS {
        refusals.clear();
    }
    refusals.insert(key, (stamp, why.to_string()));
}

/// The LoRAs a process can use.
pub struct LoraLibrary {
    dir: Option<PathBuf>,
    /// Names of the form `owner/name[/FILE]` are fetched from the Hub with these options (`None`: refused).
    hub: Option<crate::hub::HubOptions>,
    /// The object store and the key prefix (ending in `/`) of `NAME.safetensors` objects.
    store: Option<(crate::storage::Store, String)>,
    limits: LoraLimits,
    cache: Mutex<Cache>,
    /// Held while a file is read and parsed: one at a time, as a parse holds the file's bytes, its tensors and
    /// an f32 copy for the finite check (several times a large file), and jobs naming large LoRAs at once must
    /// not multiply that. A job waiting here for the LoRA another is parsing then finds it parsed.
    parsing: Mutex<()>,
    /// The same for objects of the store, taken before their download.
    store_reads: tokio::sync::Semaphore,
    /// The store's names, listed at most once a minute (heartbeats ask every few seconds).
    listing: Mutex<Option<(std::time::Instant, Vec<String>)>>,
    /// How long a LoRA waits for the others alive to leave it room before its job is retried later.
    room_patience: std::time::Duration,
}

impl LoraLibrary {
    /// `dir`: the catalogue of `NAME.safetensors` files that job names resolve in (must exist).
    pub fn new(dir: Option<PathBuf>, limits: LoraLimits) -> anyhow::Result<Self> {
        if let Some(d) = &dir {
            if !d.is_dir() {
                anyhow::bail!("--lora-dir {}: no such directory", d.display());
            }
        }
        let cache = Mutex::new(Cache::default());
        Ok(Self {
            dir,
            hub: None,
            store: None,
            limits,
            cache,
            parsing: Mutex::new(()),
            store_reads: tokio::sync::Semaphore::new(1),
            listing: Mutex::new(None),
            room_patience: std::time::Duration::from_secs(60),
        })
    }

    /// Also resolves Hugging Face references (`owner/name[/FILE.safetensors][@revision]`).
    pub fn with_hub(mut self, opts: crate::hub::HubOptions) -> Self {
        self.hub = Some(opts);
        self
    }

    /// The local file of a Hub reference, downloaded as needed.
    fn fetch_from_hub(&self, name: &str) -> Result<Arc<Lora>, LoraSourceError> {
        let Some(opts) = &self.hub else {
            return Err(LoraSourceError::Invalid(format!(
                "LoRA {name:?} is a Hugging Face reference, and this worker does not fetch LoRAs from the Hub (--lora-hub)"
            )));
        };
        let lora = crate::hub::lora::parse(name).map_err(|e| LoraSourceError::Invalid(format!("LoRA {e}")))?;
        let found = crate::hub::lora::resolve(&lora, opts, self.limits.max_file_bytes).map_err(|e| match e {
            crate::hub::lora::HubLoraError::Refused(e) => LoraSourceError::Invalid(format!("{e:#}")),
            crate::hub::lora::HubLoraError::Unreachable(e) => LoraSourceError::NotReadNow(format!("{e:#}")),
        })?;
        let loaded = match self.load_file(&found.path, name) {
            // Deleted between finding and reading (another process made room): found again on a retry.
            Err(e) if !found.path.exists() => return Err(LoraSourceError::NotReadNow(format!("{e}"))),
            Err(e) => {
                // Downloaded for this job and no LoRA: it must not stay on the disk for good.
                let trimmed = crate::hub::lora::refused(opts, &found, self.limits.max_hub_cache_bytes);
                if !trimmed.deleted.is_empty() {
                    tracing::info!(deleted = ?trimmed.deleted, kept_bytes = trimmed.kept_bytes,
                        "deleted Hub files that were no LoRA, or the least recently used LoRAs (--lora-hub-cache)");
                }
                return Err(e);
            }
            Ok(loaded) => loaded,
        };
        // Parsed: the file is not read again unless it changes, so the cache can make room now.
        if let Some(max) = self.limits.max_hub_cache_bytes {
            let trimmed = crate::hub::lora::used(opts, &found, max);
            if !trimmed.deleted.is_empty() {
                tracing::info!(deleted = ?trimmed.deleted, kept_bytes = trimmed.kept_bytes,
                    "deleted the least recently used Hub LoRAs (--lora-hub-cache {max} bytes)");
            }
        }
        Ok(loaded)
    }

    /// Also resolves names as `<prefix>NAME.safetensors` objects of `store`.
    pub fn with_store(mut self, store: crate::storage::Store, prefix: &str) -> anyhow::Result<Self> {
        let prefix = format!("{}/", prefix.trim_matches('/'));
        crate::protocol::validate_object_key("--lora-store-prefix", &format!("{prefix}x"))
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        self.store = Some((store, prefix));
        Ok(self)
    }

    /// The names jobs can use: the catalogue folder's, then the store's, sorted, at most `max`. The store is
    /// listed at most once a minute, and waited for [`LISTING_PATIENCE`] at most.
    pub async fn available(&self, max: usize) -> Vec<String> {
        let mut names = self.names(max);
        if let Some((store, prefix)) = &self.store {
            let last = self.listing.lock().clone();
            let stored = match last {
                Some((at, n)) if at.elapsed().as_secs() < 60 => n,
                last => {
                    // Heartbeats wait on this: a store that is down (and retried) gives the last listing.
                    match tokio::time::timeout(LISTING_PATIENCE, store.list(prefix, 4 * max)).await {
                        Ok(Ok(keys)) => {
                            let n: Vec<String> = keys
                                .iter()
                                .filter_map(|k| k.strip_suffix(".safetensors"))
                                // Nested objects are not catalogue names (a name with `/` is a Hub reference).
                                .filter(|n| !n.contains('/') && validate_lora_name(n).is_ok())
                                .map(str::to_string)
                                .collect();
                            *self.listing.lock() = Some((std::time::Instant::now(), n.clone()));
                            n
                        }
                        _ => {
                            tracing::debug!("cannot list the store's LoRAs now; naming the last listing");
                            last.map(|(_, n)| n).unwrap_or_default()
                        }
                    }
                }
            };
            names.extend(stored);
            names.sort();
            names.dedup();
            names.truncate(max);
        }
        names
    }

    /// The LoRAs of a job, `(name, scale)` each: from `--lora-dir`, else from the store.
    pub async fn resolve(self: &Arc<Self>, loras: &[(String, f64)]) -> Result<Vec<LoraWeight>, JobLoraError> {
        let set = |error| JobLoraError { field: "loras".to_string(), error };
        self.check_count(loras.len()).map_err(set)?;
        let mut out = Vec::with_capacity(loras.len());
        for (i, (name, scale)) in loras.iter().enumerate() {
            let at = |part: &'static str| move |error| JobLoraError { field: format!("loras[{i}].{part}"), error };
            check_scale(name, *scale).map_err(at("scale"))?;
            out.push(LoraWeight { lora: self.resolve_one(name).await.map_err(at("name"))?, scale: *scale });
            // At once: a job over the budget holds no more than one LoRA past it.
            self.check_total(&out, name).map_err(set)?;
        }
        Ok(out)
    }

    /// One LoRA of a job, by its name: a Hub file (`owner/repo/file`), else the folder's or the store's.
    async fn resolve_one(self: &Arc<Self>, name: &str) -> Result<Arc<Lora>, LoraSourceError> {
        validate_lora_name(name).map_err(LoraSourceError::Invalid)?;
        let join_failed = |e: tokio::task::JoinError| LoraSourceError::NotReadNow(e.to_string());
        if name.contains('/') {
            let (me, owned) = (self.clone(), name.to_string());
            return tokio::task::spawn_blocking(move || me.fetch_from_hub(&owned)).await.map_err(join_failed)?;
        }
        let stem = name.strip_suffix(".safetensors").unwrap_or(name).to_string();
        let in_dir = self.dir.as_ref().map(|d| d.join(format!("{stem}.safetensors"))).filter(|p| p.is_file());
        match (in_dir, &self.store) {
            (Some(path), _) => {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.load_file(&path, &stem)).await.map_err(join_failed)?
            }
            (None, Some(_)) => self.fetch_from_store(&stem).await,
            (None, None) => self.by_name(&stem),
        }
    }

    /// A LoRA stored as `<prefix><stem>.safetensors`, downloaded again only when the object changed.
    async fn fetch_from_store(self: &Arc<Self>, stem: &str) -> Result<Arc<Lora>, LoraSourceError> {
        let (store, prefix) = self.store.as_ref().expect("called with a store");
        let key = format!("{prefix}{stem}.safetensors");
        let unavailable = |e: crate::storage::StoreError| LoraSourceError::Unavailable(format!("LoRA {stem}: {e}"));
        let stamp = match store.stamp(&key).await {
            Ok(stamp) => stamp,
            Err(e) if e.is_missing() => None,
            Err(e) => return Err(unavailable(e)),
        };
        let Some(stamp) = stamp else {
            return Err(LoraSourceError::Invalid(format!("LoRA {stem:?} is not in this worker's catalogue")));
        };
        let known = || -> Option<Result<Arc<Lora>, LoraSourceError>> {
            let mut cache = self.cache.lock();
            if let Some((_, why)) = cache.refused_objects.get(&key).filter(|(s, _)| *s == stamp) {
                return Some(Err(LoraSourceError::Invalid(why.clone())));
            }
            let hash = cache.objects.get(&key).filter(|(s, _)| *s == stamp).map(|(_, hash)| *hash)?;
            cache.touch(&hash).map(Ok)
        };
        if let Some(known) = known() {
            return known;
        }
        // One object read and parsed at a time, from before its bytes are downloaded: jobs waiting here hold
        // none of theirs.
        let _one_at_a_time = self.store_reads.acquire().await.expect("never closed");
        if let Some(known) = known() {
            return known;
        }
        let bytes = match store.get_at_most(&key, self.limits.max_file_bytes).await {
            Ok(b) => b,
            Err(e @ crate::storage::StoreError::TooLarge { .. }) => {
                return Err(LoraSourceError::Invalid(format!("LoRA {stem}: {e}")))
            }
            Err(e) => return Err(unavailable(e)),
        };
        let (me, shown) = (self.clone(), stem.to_string());
        let parsed = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = me.parsing.lock();
            me.parse_cached(&shown, &bytes)
        })
        .await
        .map_err(|e| LoraSourceError::NotReadNow(e.to_string()))?;
        let (hash, lora) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                remember(&mut self.cache.lock().refused_objects, key, stamp, &e);
                return Err(e);
            }
        };
        self.cache.lock().objects.insert(key, (stamp, hash));
        Ok(lora)
    }

    pub fn limits(&self) -> &LoraLimits {
        &self.limits
    }

    /// The names jobs can use (the `.safetensors` files of `--lora-dir`), sorted, at most `max`.
    pub fn names(&self, max: usize) -> Vec<String> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_file() || t.is_symlink()).unwrap_or(false))
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".safetensors").map(str::to_string))
            .filter(|n| validate_lora_name(n).is_ok())
            .collect();
        names.sort();
        names.truncate(max);
        names
    }

    /// The LoRAs given as files (`sd-rbee generate --lora FILE[:SCALE]`).
    pub fn resolve_files(&self, loras: &[(PathBuf, f64)]) -> Result<Vec<LoraWeight>, LoraSourceError> {
        self.check_count(loras.len())?;
        let mut out = Vec::with_capacity(loras.len());
        for (path, scale) in loras {
            let shown = path.display().to_string();
            check_scale(&shown, *scale)?;
            let hub_ref = !path.exists() && self.hub.is_some() && crate::hub::lora::parse(&shown).is_ok();
            let lora = if hub_ref { self.fetch_from_hub(&shown)? } else { self.load_file(path, &shown)? };
            out.push(LoraWeight { lora, scale: *scale });
            self.check_total(&out, &shown)?;
        }
        Ok(out)
    }

    /// The job's LoRAs so far (each file counted once) within [`LoraLimits::max_job_bytes`]; `last` names the
    /// newest as the job does.
    fn check_total(&self, loras: &[LoraWeight], last: &str) -> Result<(), LoraSourceError> {
        let mut seen = std::collections::HashSet::new();
        let total: u64 = loras.iter().filter(|l| seen.insert(l.lora.hash)).map(|l| l.lora.bytes as u64).sum();
        if total > self.limits.max_job_bytes {
            return Err(LoraSourceError::Invalid(format!(
                "with LoRA {last} the job's LoRAs take {total} bytes in memory, over the limit of {} \
                 (--max-lora-bytes-per-job)",
                self.limits.max_job_bytes
            )));
        }
        Ok(())
    }

    fn check_count(&self, n: usize) -> Result<(), LoraSourceError> {
        if n > self.limits.max_per_job {
            return Err(LoraSourceError::Invalid(format!(
                "{n} LoRAs in one job, over the limit of {}",
                self.limits.max_per_job
            )));
        }
        Ok(())
    }

    /// A catalogue name's LoRA.
    fn by_name(&self, name: &str) -> Result<Arc<Lora>, LoraSourceError> {
        validate_lora_name(name).map_err(LoraSourceError::Invalid)?;
        let stem = name.strip_suffix(".safetensors").unwrap_or(name);
        let Some(dir) = &self.dir else {
            return Err(LoraSourceError::Invalid(format!(
                "LoRA {stem:?} cannot be used: this worker has no LoRA catalogue (--lora-dir, --lora-store-prefix)"
            )));
        };
        let path = dir.join(format!("{stem}.safetensors"));
        if !path.is_file() {
            return Err(LoraSourceError::Invalid(format!("LoRA {stem:?} is not in this worker's catalogue")));
        }
        self.load_file(&path, stem)
    }

    /// Reads and parses `path` unless a file with the same stamp (or the same content) was parsed before.
    pub fn load_file(&self, path: &Path, shown: &str) -> Result<Arc<Lora>, LoraSourceError> {
        let invalid = |m: String| LoraSourceError::Invalid(format!("LoRA {shown}: {m}"));
        if crate::diffusion::checkpoint::is_pickle(path) {
            let refusal = crate::diffusion::checkpoint::PICKLE_REFUSAL;
            return Err(LoraSourceError::Invalid(format!("LoRA {shown} {refusal}")));
        }
        let meta = std::fs::metadata(path).map_err(|e| invalid(e.to_string()))?;
        let stamp = FileStamp { len: meta.len(), modified: meta.modified().ok() };
        if stamp.len > self.limits.max_file_bytes {
            return Err(invalid(format!("is {} bytes, over the limit of {}", stamp.len, self.limits.max_file_bytes)));
        }
        let parsed = || {
            let mut cache = self.cache.lock();
            let hash = cache.files.get(path).filter(|(s, _)| *s == stamp).map(|(_, hash)| *hash)?;
            cache.touch(&hash)
        };
        let refused = || {
            let cache = self.cache.lock();
            let (s, why) = cache.refused_files.get(path)?;
            (*s == stamp).then(|| LoraSourceError::Invalid(why.clone()))
        };
        if let Some(lora) = parsed() {
            return Ok(lora);
        }
        if let Some(e) = refused() {
            return Err(e);
        }
        let _one_at_a_time = self.parsing.lock();
        if let Some(lora) = parsed() {
            return Ok(lora);
        }
        if let Some(e) = refused() {
            return Err(e);
        }
        let mut bytes = Vec::with_capacity(stamp.len as usize);
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|f| f.take(self.limits.max_file_bytes + 1).read_to_end(&mut bytes))
            .map_err(|e| invalid(e.to_string()))?;
        if bytes.len() as u64 > self.limits.max_file_bytes {
            return Err(invalid(format!("is over the limit of {} bytes", self.limits.max_file_bytes)));
        }
        let (hash, lora) = match self.parse_cached(shown, &bytes) {
            Ok(parsed) => parsed,
            Err(e) => {
                remember(&mut self.cache.lock().refused_files, path.to_path_buf(), stamp, &e);
                return Err(e);
            }
        };
        self.cache.lock().files.insert(path.to_path_buf(), (stamp, hash));
        Ok(lora)
    }

    /// The LoRA in `bytes` and their SHA-256: the cached one with that hash, else parsed and cached.
    fn parse_cached(&self, shown: &str, bytes: &[u8]) -> Result<([u8; 32], Arc<Lora>), LoraSourceError> {
        let hash: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(bytes).into();
        if let Some(lora) = self.cache.lock().touch(&hash) {
            return Ok((hash, lora));
        }
        self.wait_for_room(shown, bytes.len())?;
        let lora = Arc::new(Lora::parse(shown, bytes, hash)?);
        self.cache.lock().insert(lora.clone(), self.limits.max_cached_bytes);
        Ok((hash, lora))
    }

    /// Waits until the parsed LoRAs alive (the cache's, and those the jobs in hand hold, which the cache's
    /// own bound does not count) leave room for `need` more bytes within the cache's size and one job's
    /// ([`LoraLimits::max_cached_bytes`] + [`LoraLimits::max_job_bytes`]); the cache gives up the LoRAs
    /// only it holds first. Jobs naming many large LoRAs at once would otherwise hold them all. Past
    /// `room_patience` the job is retried later ([`LoraSourceError::NotReadNow`]).
    fn wait_for_room(&self, shown: &str, need: usize) -> Result<(), LoraSourceError> {
        let max = self.limits.max_cached_bytes.saturating_add(self.limits.max_job_bytes as usize);
        let start = std::time::Instant::now();
        loop {
            let held = {
                let mut cache = self.cache.lock();
                let mut held = cache.held_bytes();
                while held.saturating_add(need) > max && cache.drop_an_unused() {
                    held = cache.held_bytes();
                }
                held
            };
            if held == 0 || held.saturating_add(need) <= max {
                return Ok(());
            }
            if start.elapsed() >= self.room_patience {
                return Err(LoraSourceError::NotReadNow(format!(
                    "LoRA {shown} ({need} bytes) waited {} s for the {held} bytes of LoRAs the jobs in hand hold                      to leave it room within {max} bytes (the LoRA cache's 4 GiB and --max-lora-bytes-per-job)",
                    self.room_patience.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Cache {
    fn touch(&mut self, hash: &[u8; 32]) -> Option<Arc<Lora>> {
        self.clock += 1;
        let clock = self.clock;
        self.parsed.get_mut(hash).map(|(lora, used)| {
            *used = clock;
            lora.clone()
        })
    }

    /// The bytes of the parsed LoRAs alive (forgetting those that are not).
    fn held_bytes(&mut self) -> usize {
        self.live.retain(|_, (lora, _)| lora.strong_count() > 0);
        self.live.values().map(|(_, bytes)| bytes).sum()
    }

    /// Drops the least recently used LoRA that only the cache holds; whether there was one.
    fn drop_an_unused(&mut self) -> bool {
        let unused = self.parsed.iter().filter(|(_, (l, _))| Arc::strong_count(l) == 1).min_by_key(|(_, (_, u))| *u);
        let Some(hash) = unused.map(|(h, _)| *h) else { return false };
        self.parsed.remove(&hash);
        true
    }

    fn insert(&mut self, lora: Arc<Lora>, max_bytes: usize) {
        self.live.insert(lora.hash, (Arc::downgrade(&lora), lora.bytes));
        self.clock += 1;
        self.parsed.insert(lora.hash, (lora, self.clock));
        // Evict the least recently used until the rest fits (the newest always stays).
        while self.parsed.values().map(|(l, _)| l.bytes).sum::<usize>() > max_bytes && self.parsed.len() > 1 {
            let oldest = self.parsed.iter().min_by_key(|(_, (_, used))| *used).map(|(h, _)| *h);
            if let Some(h) = oldest {
                self.parsed.remove(&h);
            }
        }
    }
}

fn check_scale(name: &str, scale: f64) -> Result<(), LoraSourceError> {
    if !scale.is_finite() || scale.abs() > MAX_LORA_SCALE {
        return Err(LoraSourceError::Invalid(format!(
            "LoRA {name}: scale must be a number between -{MAX_LORA_SCALE} and {MAX_LORA_SCALE}, got {scale}"
        )));
    }
    Ok(())
}

/// A catalogue name (see [`crate::protocol::validate_lora_name`]), as a message for the user.
pub fn validate_lora_name(name: &str) -> Result<(), String> {
    crate::protocol::validate_lora_name("loras", name).map_err(|e| e.message)
}

/// Parses `FILE[:SCALE]` (`--lora`): the part after the last `:` is the scale when it is a number.
pub fn parse_lora_arg(spec: &str) -> Result<(PathBuf, f64), String> {
    if let Some((path, scale)) = spec.rsplit_once(':') {
        if let Ok(s) = scale.parse::<f64>() {
            if path.is_empty() {
                return Err(format!("{spec}: no file before the scale"));
            }
            return Ok((PathBuf::from(path), s));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

#[cfg(test)]
mod tests;
