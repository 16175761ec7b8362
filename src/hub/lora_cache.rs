//! The disk the Hub's LoRAs take in the Hugging Face cache, kept under a bound.
//!
//! Any job may name any public LoRA, so without a bound a worker's cache grows until its disk is full. Each
//! file that was used as a LoRA (it parsed as one) is marked: an empty file `.sd-rbee-loras/<commit>/<file>` in
//! its repo folder, beside `snapshots/<commit>/<file>`, whose modification time is the last use (the blob's own
//! time is left alone: the LoRA library knows a file by its size and time, and reads it again when they
//! change). Past the bound, the least recently used marked files are deleted, link and blob, so only what was
//! used as a LoRA is ever deleted, never a model's files, and every worker sharing the cache (or restarting)
//! sees the same marks. A file downloaded for a LoRA that does not parse as one is marked as last used at the
//! epoch (see `lora::refused`): it counts, and goes first. A file used within [`IN_USE_GRACE`] is never
//! deleted: a job of another process may have resolved it and not yet read it. Repo folders stay (their
//! `refs/` and blob locks may be in use by a download of another process); only their content goes.
//!
//! Where the cache cannot hold links (no symlinks: hf-hub copies the file into the snapshot), only the copy
//! is deleted and its blob stays: bounded deletion needs links, as on Linux and macOS.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The folder of marks, in each repo folder that has one.
const MARKS: &str = ".sd-rbee-loras";

/// How long after its last use a file is safe from deletion.
pub const IN_USE_GRACE: Duration = Duration::from_secs(10 * 60);

/// Marks `pointer` (`<repo folder>/snapshots/<commit>/<file>`) as used as a LoRA just now. A failure is
/// logged: the file is used anyway, only its place in the deletion order is lost.
pub fn record_use(pointer: &Path) {
    record_use_at(pointer, SystemTime::now())
}

/// Marks `pointer` as a LoRA file last used at `when` (the epoch: the first to go, and never in the grace).
pub fn record_use_at(pointer: &Path, when: SystemTime) {
    let Some(mark) = mark_of(pointer) else {
        tracing::warn!("{} is not a file of a Hugging Face cache snapshot: not recorded", pointer.display());
        return;
    };
    let marked = std::fs::create_dir_all(mark.parent().expect("<commit>/<file>"))
        .and_then(|()| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&mark))
        .and_then(|f| f.set_modified(when));
    if let Err(e) = marked {
        tracing::warn!("cannot record the use of LoRA {} in {}: {e}", pointer.display(), mark.display());
    }
}

/// The mark of `<repo folder>/snapshots/<commit>/<file>`: `<repo folder>/.sd-rbee-loras/<commit>/<file>`.
fn mark_of(pointer: &Path) -> Option<PathBuf> {
    let names: Vec<&str> = pointer
        .components()
        .rev()
        .take(3)
        .map(|c| match c {
            Component::Normal(name) => name.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let [file, commit, "snapshots"] = names[..] else { return None };
    let repo_dir = pointer.ancestors().nth(3)?;
    Some(repo_dir.join(MARKS).join(commit).join(file))
}

/// One marked file: its content (the blob), the links to it and their marks, its size and last use.
struct Marked {
    repo_dir: PathBuf,
    links: Vec<PathBuf>,
    marks: Vec<PathBuf>,
    bytes: u64,
}

impl Marked {
    /// The latest use its marks record (read now: another process may have used it since).
    fn last_use(&self) -> SystemTime {
        let times = self.marks.iter().filter_map(|m| m.metadata().and_then(|m| m.modified()).ok());
        times.max().unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// What [`trim`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Trimmed {
    /// The files deleted (`<repo folder name>/snapshots/<commit>/<file>`), least recently used first.
    pub deleted: Vec<String>,
    /// The marked LoRA bytes left in the cache.
    pub kept_bytes: u64,
}

/// Deletes the least recently used LoRA files of the cache at `cache_root` until the marked ones take at
/// most `max_bytes`, sparing `keep` and anything used within `grace`.
pub fn trim(cache_root: &Path, max_bytes: u64, keep: Option<&Path>, grace: Duration) -> Trimmed {
    let mut files = marked(cache_root);
    let mut total: u64 = files.values().map(|f| f.bytes).sum();
    let mut trimmed = Trimmed::default();
    if total > max_bytes {
        let keep = keep.map(|keep| std::fs::canonicalize(keep).unwrap_or_else(|_| keep.to_path_buf()));
        let mut order: Vec<(SystemTime, PathBuf)> =
            files.iter().map(|(blob, f)| (f.last_use(), blob.clone())).collect();
        order.sort();
        let mut tidied = BTreeSet::new();
        for (_, blob) in order {
            if total <= max_bytes {
                break;
            }
            let file = &files[&blob];
            // Asked again now: a use by another process since the listing spares it.
            let recent = SystemTime::now().duration_since(file.last_use()).map(|age| age < grace).unwrap_or(true);
            if keep.as_ref() == Some(&blob) || recent {
                continue;
            }
            let file = files.remove(&blob).expect("listed");
            for link in &file.links {
                remove(link);
            }
            // The content itself, unless the link was a copy (no blob behind it). Counted as freed only when
            // it is gone.
            let freed = !blob.starts_with(file.repo_dir.join("blobs")) || remove(&blob);
            for mark in &file.marks {
                remove(mark);
            }
            if freed {
                total -= file.bytes;
                let folder = file.repo_dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let shown = |l: &PathBuf| format!("{folder}/{}", l.strip_prefix(&file.repo_dir).unwrap_or(l).display());
                trimmed.deleted.extend(file.links.iter().map(shown));
            }
            tidied.insert(file.repo_dir);
        }
        tidied.iter().for_each(|repo_dir| tidy(repo_dir));
    }
    trimmed.kept_bytes = total;
    trimmed
}

/// Deletes `path`; true when it is gone (deleted now, or already).
fn remove(path: &Path) -> bool {
    match std::fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!("cannot delete LoRA {}: {e}", path.display());
            false
        }
    }
}

/// Every marked LoRA file that is still there, by its blob (two commits may link one blob). Marks of files
/// that are gone (deleted by hand, or by `huggingface-cli delete-cache`) are removed.
fn marked(cache_root: &Path) -> HashMap<PathBuf, Marked> {
    // Canonical, as the blobs are: a cache reached through a link still finds its blobs in its folders.
    let cache_root = std::fs::canonicalize(cache_root).unwrap_or_else(|_| cache_root.to_path_buf());
    let mut files: HashMap<PathBuf, Marked> = HashMap::new();
    for repo_dir in entries(&cache_root) {
        for commit in entries(&repo_dir.join(MARKS)) {
            for mark in entries(&commit) {
                let (Some(commit_name), Some(file_name)) = (commit.file_name(), mark.file_name()) else { continue };
                let link = repo_dir.join("snapshots").join(commit_name).join(file_name);
                let (Ok(meta), Ok(blob)) = (std::fs::metadata(&link), std::fs::canonicalize(&link)) else {
                    remove(&mark);
                    continue;
                };
                let file = files.entry(blob).or_insert_with(|| Marked {
                    repo_dir: repo_dir.clone(),
                    links: Vec::new(),
                    marks: Vec::new(),
                    bytes: meta.len(),
                });
                file.links.push(link);
                file.marks.push(mark);
            }
        }
    }
    // A blob that a file without a mark also points at (a model's, at this commit or another) is not the
    // LoRA's to delete, nor counted: a job may name any file of any repo as its LoRA.
    let repos: BTreeSet<PathBuf> = files.values().map(|f| f.repo_dir.clone()).collect();
    for repo_dir in repos {
        let mut links = Vec::new();
        files_under(&repo_dir.join("snapshots"), &mut links);
        for link in links {
            let Ok(blob) = std::fs::canonicalize(&link) else { continue };
            if files.get(&blob).is_some_and(|f| !f.links.contains(&link)) {
                files.remove(&blob);
            }
        }
    }
    files
}

/// Every file (or link) under `dir`, at any depth.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in entries(dir) {
        match entry.symlink_metadata() {
            Ok(meta) if meta.is_dir() => files_under(&entry, out),
            Ok(_) => out.push(entry),
            Err(_) => {}
        }
    }
}

/// After deletions in a repo folder: links left pointing at nothing go (another commit's link to a deleted
/// blob), and empty snapshot and mark folders.
fn tidy(repo_dir: &Path) {
    for snapshot in entries(&repo_dir.join("snapshots")) {
        for entry in entries(&snapshot) {
            let dangling = entry.symlink_metadata().is_ok_and(|m| m.is_symlink()) && !entry.exists();
            if dangling {
                remove(&entry);
            }
        }
        let _ = std::fs::remove_dir(&snapshot); // only when empty
    }
    for commit in entries(&repo_dir.join(MARKS)) {
        let _ = std::fs::remove_dir(&commit);
    }
    let _ = std::fs::remove_dir(repo_dir.join(MARKS));
}

/// The paths in `dir` (none when it cannot be read).
fn entries(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir).into_iter().flatten().filter_map(Result::ok).map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{FakeCache, COMMIT};
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const FILE: &str = "pytorch_lora_weights.safetensors";

    /// A LoRA file of `bytes` bytes in `repo`, recorded as used `ago` before now.
    fn lora(cache: &FakeCache, repo: &str, bytes: usize, ago: Duration) -> PathBuf {
        cache.add(repo, COMMIT, FILE, &"x".repeat(bytes));
        let pointer = cache.repo_dir(repo).join("snapshots").join(COMMIT).join(FILE);
        used(&pointer, ago);
        pointer
    }

    /// Records a use of `pointer` `ago` before now.
    fn used(pointer: &Path, ago: Duration) {
        record_use(pointer);
        let mark = mark_of(pointer).unwrap();
        std::fs::OpenOptions::new().write(true).open(mark).unwrap().set_modified(SystemTime::now() - ago).unwrap();
    }

    fn blobs(cache: &FakeCache, repo: &str) -> usize {
        entries(&cache.repo_dir(repo).join("blobs")).count()
    }

    #[test]
    fn the_least_recently_used_loras_go_first_until_the_rest_fit() {
        let cache = FakeCache::new();
        let root = cache.repo_dir("x/x").parent().unwrap().to_path_buf();
        let oldest = lora(&cache, "o/oldest", 100, 300 * MINUTE);
        let old = lora(&cache, "o/old", 100, 200 * MINUTE);
        let newer = lora(&cache, "o/newer", 100, 100 * MINUTE);
        let newest = lora(&cache, "o/newest", 100, MINUTE);
        // A model's files in the same cache: never marked, never deleted.
        cache.add("o/model", COMMIT, "unet/diffusion_pytorch_model.safetensors", &"m".repeat(1000));
        let blob_time = |p: &Path| p.metadata().unwrap().modified().unwrap();
        let newest_time = blob_time(&newest);

        assert_eq!(trim(&root, 400, Some(&newest), IN_USE_GRACE), Trimmed { deleted: vec![], kept_bytes: 400 });
        let trimmed = trim(&root, 250, Some(&newest), IN_USE_GRACE);
        let deleted = |repo: &str| format!("models--o--{repo}/snapshots/{COMMIT}/{FILE}");
        assert_eq!(trimmed.deleted, [deleted("oldest"), deleted("old")]);
        assert_eq!(trimmed.kept_bytes, 200);
        assert!(!oldest.exists() && !old.exists() && newer.exists() && newest.exists());
        // Their content went, link and blob (nothing dangles to stop a download again), and so did the marks.
        assert_eq!((blobs(&cache, "o/oldest"), blobs(&cache, "o/old"), blobs(&cache, "o/newer")), (0, 0, 1));
        assert!(oldest.symlink_metadata().is_err() && !cache.repo_dir("o/old").join(MARKS).exists());
        assert!(cache.repo_dir("o/model").join("snapshots").join(COMMIT).join("unet").exists());
        // Marking a use leaves the file's own time alone (a changed time would make it read again).
        used(&newest, Duration::ZERO);
        assert_eq!(blob_time(&newest), newest_time);

        // The file in use is spared even when it alone is over the bound, and so is a recent one.
        let trimmed = trim(&root, 50, Some(&newer), IN_USE_GRACE);
        assert_eq!(trimmed, Trimmed { deleted: vec![], kept_bytes: 200 }, "newest is within the grace");
        let trimmed = trim(&root, 50, Some(&newer), Duration::ZERO);
        assert_eq!(trimmed.kept_bytes, 100);
        assert!(newer.exists() && !newest.exists());
    }

    #[test]
    fn a_blob_two_commits_link_is_counted_once_and_goes_with_both_links() {
        let cache = FakeCache::new();
        let root = cache.repo_dir("x/x").parent().unwrap().to_path_buf();
        let first = lora(&cache, "o/two", 100, 300 * MINUTE);
        // The same content at a later commit (hf-hub links both to one blob).
        let second = cache.repo_dir("o/two").join("snapshots").join("f".repeat(40)).join(FILE);
        std::fs::create_dir_all(second.parent().unwrap()).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(std::fs::read_link(&first).unwrap(), &second).unwrap();
        used(&second, 200 * MINUTE);
        // Another file of the same repo, not a LoRA: kept.
        cache.add("o/two", COMMIT, "README.md", "read me");
        let new = lora(&cache, "o/new", 100, MINUTE);
        assert_eq!(trim(&root, 200, Some(&new), IN_USE_GRACE).kept_bytes, 200, "one blob, counted once");
        let trimmed = trim(&root, 100, Some(&new), IN_USE_GRACE);
        assert_eq!(trimmed.deleted.len(), 2, "{trimmed:?}");
        assert!(first.symlink_metadata().is_err() && second.symlink_metadata().is_err());
        assert!(!second.parent().unwrap().exists(), "the snapshot left empty goes");
        assert!(cache.repo_dir("o/two").join("snapshots").join(COMMIT).join("README.md").exists());
        assert_eq!(blobs(&cache, "o/two"), 1, "README.md's blob");
    }

    #[test]
    fn a_blob_a_models_file_also_links_is_neither_deleted_nor_counted() {
        let cache = FakeCache::new();
        let root = cache.repo_dir("x/x").parent().unwrap().to_path_buf();
        // A job named a model's VAE as its LoRA: marked (at another commit), its blob shared with the model's.
        cache.add("o/model", COMMIT, "vae/diffusion_pytorch_model.safetensors", &"v".repeat(100));
        let model_file =
            cache.repo_dir("o/model").join("snapshots").join(COMMIT).join("vae/diffusion_pytorch_model.safetensors");
        let named = cache
            .repo_dir("o/model")
            .join("snapshots")
            .join("f".repeat(40))
            .join("diffusion_pytorch_model.safetensors");
        std::fs::create_dir_all(named.parent().unwrap()).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(std::fs::canonicalize(&model_file).unwrap(), &named).unwrap();
        used(&named, 300 * MINUTE);
        let other = lora(&cache, "o/other", 100, 300 * MINUTE);
        let trimmed = trim(&root, 0, None, IN_USE_GRACE);
        assert_eq!((trimmed.deleted.len(), trimmed.kept_bytes), (1, 0), "only the real LoRA: {trimmed:?}");
        assert!(!other.exists() && model_file.exists() && named.exists());
    }

    #[test]
    fn a_cache_reached_through_a_link_still_has_its_blobs_deleted() {
        let cache = FakeCache::new();
        let root = cache.repo_dir("x/x").parent().unwrap().to_path_buf();
        let elsewhere = tempfile::tempdir().unwrap();
        let linked = elsewhere.path().join("hub");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&root, &linked).unwrap();
        let old = lora(&cache, "o/old", 100, 300 * MINUTE);
        let new = lora(&cache, "o/new", 100, MINUTE);
        let trimmed = trim(&linked, 100, Some(&linked.join(new.strip_prefix(&root).unwrap())), IN_USE_GRACE);
        assert_eq!((trimmed.deleted.len(), trimmed.kept_bytes), (1, 100));
        assert!(!old.exists() && blobs(&cache, "o/old") == 0, "the blob went, not only the link");
    }

    #[test]
    fn only_snapshot_files_are_marked() {
        assert!(mark_of(Path::new("/c/models--a--b/snapshots/abc/x.safetensors")).is_some());
        for odd in ["/c/models--a--b/blobs/abc/x", "/c/models--a--b/snapshots/../x", "x.safetensors"] {
            assert_eq!(mark_of(Path::new(odd)), None, "{odd}");
        }
    }
}
