//! The disk the Hub's LoRAs take in the Hugging Face cache, kept under a bound.
//!
//! Any job may name any public LoRA, so without a bound a worker's cache grows until its disk is full. Each
//! LoRA file resolved from the Hub is recorded in its repo folder (`.sd-rbee-loras`, one `snapshots/<commit>/<file>`
//! line each) and its blob's modification time is set to the time of use. Past the bound, the least recently
//! used recorded files are deleted (blob and links; the repo folder too once nothing is left in it), so only
//! what was fetched as a LoRA is ever deleted, never a model's files, and every worker sharing the cache (or
//! restarting) sees the same record. A file used within [`IN_USE_GRACE`] is never deleted: a job of another
//! process may have resolved it and not yet read it.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The record of LoRA files, in each repo folder that has one.
const RECORD: &str = ".sd-rbee-loras";

/// How long after its last use a file is safe from deletion.
pub const IN_USE_GRACE: Duration = Duration::from_secs(10 * 60);

/// Records that `pointer` (`<repo folder>/snapshots/<commit>/<file>`) was used as a LoRA just now. Failures are
/// logged: the file is used anyway, only its place in the eviction order is lost.
pub(super) fn record_use(repo_dir: &Path, pointer: &Path) {
    let Some(line) = pointer.strip_prefix(repo_dir).ok().and_then(|p| p.to_str()).map(str::to_string) else {
        return;
    };
    let record = repo_dir.join(RECORD);
    let known = std::fs::read_to_string(&record).unwrap_or_default();
    if !known.lines().any(|l| l == line) {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&record)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            tracing::warn!("cannot record LoRA {} in {}: {e}", pointer.display(), record.display());
        }
    }
    // The blob's time, through the link: when the file was last used.
    let touched =
        std::fs::OpenOptions::new().append(true).open(pointer).and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!("cannot mark LoRA {} as used: {e}", pointer.display());
    }
}

/// One recorded file: its content (the blob), the links to it, its size and last use.
struct Recorded {
    repo_dir: PathBuf,
    links: Vec<PathBuf>,
    bytes: u64,
    used: SystemTime,
}

/// What [`trim`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Trimmed {
    /// The files deleted (`<repo folder name>/snapshots/<commit>/<file>`), least recently used first.
    pub deleted: Vec<String>,
    /// The recorded LoRA bytes left in the cache.
    pub kept_bytes: u64,
}

/// Deletes the least recently used LoRA files of the cache at `cache_root` until the recorded ones take at
/// most `max_bytes`, sparing `keep` and anything used within `grace`.
pub fn trim(cache_root: &Path, max_bytes: u64, keep: &Path, grace: Duration) -> Trimmed {
    let mut files = recorded(cache_root);
    let mut total: u64 = files.values().map(|f| f.bytes).sum();
    let mut trimmed = Trimmed::default();
    if total <= max_bytes {
        trimmed.kept_bytes = total;
        return trimmed;
    }
    let keep = std::fs::canonicalize(keep).unwrap_or_else(|_| keep.to_path_buf());
    let now = SystemTime::now();
    let mut order: Vec<(SystemTime, PathBuf)> = files.iter().map(|(blob, f)| (f.used, blob.clone())).collect();
    order.sort();
    let mut touched_repos = BTreeSet::new();
    for (used, blob) in order {
        if total <= max_bytes {
            break;
        }
        let recent = now.duration_since(used).map(|age| age < grace).unwrap_or(true);
        if blob == keep || recent {
            continue;
        }
        let file = files.remove(&blob).expect("listed");
        for link in &file.links {
            if let Err(e) = std::fs::remove_file(link) {
                tracing::warn!("cannot delete LoRA {}: {e}", link.display());
            }
        }
        // The content itself, unless the link was a copy (no blob behind it).
        if blob.starts_with(file.repo_dir.join("blobs")) {
            if let Err(e) = std::fs::remove_file(&blob) {
                tracing::warn!("cannot delete LoRA {}: {e}", blob.display());
            }
        }
        total -= file.bytes;
        let name = |link: &PathBuf| {
            let folder = file.repo_dir.file_name().unwrap_or_default().to_string_lossy();
            format!("{folder}/{}", link.strip_prefix(&file.repo_dir).unwrap_or(link).display())
        };
        trimmed.deleted.extend(file.links.iter().map(name));
        touched_repos.insert(file.repo_dir);
    }
    for repo_dir in touched_repos {
        tidy(&repo_dir);
    }
    trimmed.kept_bytes = total;
    trimmed
}

/// Every recorded LoRA file that is still there, by its blob (two commits may link one blob).
fn recorded(cache_root: &Path) -> HashMap<PathBuf, Recorded> {
    let mut files: HashMap<PathBuf, Recorded> = HashMap::new();
    for repo_dir in entries(cache_root).filter(|p| p.join(RECORD).is_file()) {
        let record = std::fs::read_to_string(repo_dir.join(RECORD)).unwrap_or_default();
        // Only what this module writes: a file in a snapshot, never a path out of the repo folder.
        let lines = record.lines().filter(|l| l.starts_with("snapshots/") && !l.split('/').any(|p| p == ".."));
        for line in lines.collect::<BTreeSet<_>>() {
            let link = repo_dir.join(line);
            let (Ok(meta), Ok(blob)) = (std::fs::metadata(&link), std::fs::canonicalize(&link)) else { continue };
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let file = files.entry(blob).or_insert_with(|| Recorded {
                repo_dir: repo_dir.clone(),
                links: Vec::new(),
                bytes: meta.len(),
                used,
            });
            file.links.push(link);
        }
    }
    files
}

/// After deletions in a repo folder: links left pointing at nothing and empty snapshots go (a dangling link
/// would stop the file being downloaded again), and the whole folder once it holds no content and no
/// download is under way in it (its blob locks are all free).
fn tidy(repo_dir: &Path) {
    let snapshots = repo_dir.join("snapshots");
    for snapshot in entries(&snapshots) {
        for entry in entries(&snapshot) {
            let dangling = entry.symlink_metadata().is_ok_and(|m| m.is_symlink()) && !entry.exists();
            if dangling {
                let _ = std::fs::remove_file(&entry);
            }
        }
        let _ = std::fs::remove_dir(&snapshot); // only when empty
    }
    if entries(&snapshots).next().is_some() {
        return;
    }
    let blobs: Vec<PathBuf> = entries(&repo_dir.join("blobs")).collect();
    if blobs.iter().any(|b| b.extension().is_none_or(|e| e != "lock")) {
        return;
    }
    // Held while the folder goes: a download that starts now waits, then finds no folder and fails (retried).
    let mut held = Vec::new();
    for lock in &blobs {
        match std::fs::File::open(lock) {
            Ok(file) if super::transfer::try_lock(&file) => held.push(file),
            _ => return,
        }
    }
    if let Err(e) = std::fs::remove_dir_all(repo_dir) {
        tracing::warn!("cannot delete {}: {e}", repo_dir.display());
    }
}

/// The paths in `dir` (none when it cannot be read).
fn entries(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok).map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{FakeCache, COMMIT};
    use super::*;

    /// A LoRA file of `bytes` bytes in `repo`, recorded as used `ago` before now.
    fn lora(cache: &FakeCache, repo: &str, bytes: usize, ago: Duration) -> PathBuf {
        cache.add(repo, COMMIT, "pytorch_lora_weights.safetensors", &"x".repeat(bytes));
        let repo_dir = cache.repo_dir(repo);
        let pointer = repo_dir.join("snapshots").join(COMMIT).join("pytorch_lora_weights.safetensors");
        record_use(&repo_dir, &pointer);
        let file = std::fs::OpenOptions::new().append(true).open(&pointer).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
        pointer
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_least_recently_used_loras_go_first_until_the_rest_fit() {
        let cache = FakeCache::new();
        let root = cache.repo_dir("x/x").parent().unwrap().to_path_buf();
        let oldest = lora(&cache, "o/oldest", 100, 300 * MINUTE);
        let old = lora(&cache, "o/old", 100, 200 * MINUTE);
        let newer = lora(&cache, "o/newer", 100, 100 * MINUTE);
        let newest = lora(&cache, "o/newest", 100, MINUTE);
        // A model's files in the same cache: never recorded, never deleted.
        cache.add("o/model", COMMIT, "unet/diffusion_pytorch_model.safetensors", &"m".repeat(1000));

        assert_eq!(trim(&root, 400, &newest, IN_USE_GRACE), Trimmed { deleted: vec![], kept_bytes: 400 });
        let trimmed = trim(&root, 250, &newest, IN_USE_GRACE);
        assert_eq!(
            trimmed.deleted,
            [
                format!("models--o--oldest/snapshots/{COMMIT}/pytorch_lora_weights.safetensors"),
                format!("models--o--old/snapshots/{COMMIT}/pytorch_lora_weights.safetensors"),
            ]
        );
        assert_eq!(trimmed.kept_bytes, 200);
        assert!(!oldest.exists() && !old.exists() && newer.exists() && newest.exists());
        // Nothing was left in those repos: their folders went too, so a download starts clean.
        assert!(!cache.repo_dir("o/oldest").exists() && !cache.repo_dir("o/old").exists());
        assert!(cache.repo_dir("o/model").join("snapshots").join(COMMIT).join("unet").exists());

        // The file in use is spared even when it alone is over the bound, and so is a recent one.
        let trimmed = trim(&root, 50, &newer, IN_USE_GRACE);
        assert_eq!(trimmed, Trimmed { deleted: vec![], kept_bytes: 200 }, "newest is within the grace");
        let trimmed = trim(&root, 50, &newer, Duration::ZERO);
        assert_eq!(trimmed.kept_bytes, 100);
        assert!(newer.exists() && !newest.exists());
    }

    #[test]
    fn a_repo_folder_with_a_download_under_way_is_kept() {
        let cache = FakeCache::new();
        let root = cache.repo_dir("x/x").parent().unwrap().to_path_buf();
        let (old, older) = (lora(&cache, "o/busy", 100, 200 * MINUTE), lora(&cache, "o/idle", 100, 300 * MINUTE));
        let lock = |repo: &str| {
            let file = std::fs::File::create(cache.repo_dir(repo).join("blobs").join("next.lock")).unwrap();
            assert!(super::super::transfer::try_lock(&file));
            file
        };
        let _held = lock("o/busy");
        drop(lock("o/idle"));
        let trimmed = trim(&root, 0, Path::new("/nothing"), IN_USE_GRACE);
        assert_eq!((trimmed.deleted.len(), trimmed.kept_bytes), (2, 0));
        assert!(!old.exists() && !older.exists());
        assert!(cache.repo_dir("o/busy").join("blobs").join("next.lock").exists(), "held: the folder stays");
        assert!(!cache.repo_dir("o/idle").exists(), "a free lock is no download");
    }

    #[test]
    fn a_dangling_link_is_removed_with_its_blob_and_the_rest_of_the_repo_is_kept() {
        let cache = FakeCache::new();
        let root = cache.repo_dir("x/x").parent().unwrap().to_path_buf();
        let old = lora(&cache, "o/two", 100, 300 * MINUTE);
        // Another file of the same repo, not a LoRA: kept, and so is the folder.
        cache.add("o/two", COMMIT, "README.md", "read me");
        let new = lora(&cache, "o/new", 100, MINUTE);
        let trimmed = trim(&root, 100, &new, IN_USE_GRACE);
        assert_eq!(trimmed.deleted.len(), 1);
        assert!(old.symlink_metadata().is_err(), "the link is gone, not left dangling");
        assert!(cache.repo_dir("o/two").join("snapshots").join(COMMIT).join("README.md").exists());
        // Recording the same file again adds no line.
        record_use(&cache.repo_dir("o/new"), &new);
        let record = std::fs::read_to_string(cache.repo_dir("o/new").join(RECORD)).unwrap();
        assert_eq!(record.lines().count(), 1, "{record}");
    }
}
