//! The Hub's HTTP with every wait bounded ([`HubClient`]): the repo info request, and file downloads into the
//! hf-hub cache layout (`blobs/<etag>`, `snapshots/<commit>/<file>` linking to it) that resume where they
//! stopped. A Hub that does not connect or answer within `HF_HUB_ETAG_TIMEOUT` is unreachable; a download that
//! receives nothing for `HF_HUB_DOWNLOAD_TIMEOUT` resumes, and fails after [`STALLED_ATTEMPTS`] attempts in a row
//! that got nothing, as `huggingface_hub` does.
//!
//! hf-hub 0.4's own client sets no timeouts: a download whose connection went silent blocked its thread for
//! ever, and with it every later model load of the worker (they run one at a time). hf-hub 1.0 is another crate,
//! built around hf-xet. So the requests are made here with hf-hub's own HTTP client (ureq), and hf-hub still
//! names the repos and the cache.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hf_hub::api::RepoInfo;
use ureq::{Agent, AgentBuilder, RedirectAuthHeaders};

use super::cache::CachedRepo;
use super::options::HubOptions;

/// Attempts in a row that may receive nothing before a download fails (`huggingface_hub` resumes 5 times).
pub(super) const STALLED_ATTEMPTS: u32 = 6;

/// An HTTP error answer from the Hub.
pub(super) struct HttpFailure {
    pub(super) status: u16,
    pub(super) error_code: Option<String>,
    pub(super) message: Option<String>,
    /// The request carried the token (HF_TOKEN): a refusal is then the token's, not a want of one.
    pub(super) token_sent: bool,
}

impl HttpFailure {
    fn of(response: &ureq::Response) -> Self {
        Self {
            status: response.status(),
            error_code: response.header("x-error-code").map(str::to_string),
            message: response.header("x-error-message").map(str::to_string),
            token_sent: false,
        }
    }

    /// Why the Hub refused, in words, for `repo` at `revision` (and `file` when downloading).
    pub(super) fn explain(&self, repo: &str, revision: &str, file: Option<&str>) -> String {
        let code = self.error_code.as_deref().unwrap_or("");
        let detail = self.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
        match (self.status, code) {
            (_, "RepositoryNotFound") | (401, _) if self.token_sent => format!(
                "repository {repo} was not found on the Hugging Face Hub, or the token in HF_TOKEN cannot read it (it is private or gated, or the token is not valid){detail}"
            ),
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

    /// The Hub is overloaded or failing: asking again later may work.
    pub(super) fn is_transient(&self) -> bool {
        self.status >= 500 || self.status == 429
    }
}

/// Why a Hub request failed.
pub(super) enum HubError {
    /// The Hub answered with an error status.
    Http(HttpFailure),
    /// No answer in time (network, TLS, proxy, a silent connection), or an unreadable one.
    Unreachable(String),
    /// The answer came, but could not be written to the cache.
    Local(String),
    /// The file is larger than the caller takes (it was not downloaded).
    TooLarge(String),
}

impl HubError {
    fn from_ureq(err: ureq::Error) -> Self {
        match err {
            ureq::Error::Status(_, response) => Self::Http(HttpFailure::of(&response)),
            ureq::Error::Transport(t) => Self::Unreachable(t.to_string()),
        }
    }
}

/// A Hub client whose every connection, request and read has a time limit.
pub(super) struct HubClient {
    endpoint: String,
    token: Option<String>,
    /// The repo info request: connect and each read within the etag timeout.
    requests: Agent,
    /// A file's metadata, within the etag timeout too; follows no redirect, so that the file's commit and etag
    /// are read off the Hub's own answer.
    metadata: Agent,
    /// Downloads: each read within the download timeout; follows redirects (to the CDN), sending the token to
    /// the Hub's own host only.
    downloads: Agent,
    download_timeout: Duration,
}

/// What the Hub says of one file before it is downloaded.
struct FileMeta {
    etag: String,
    size: u64,
    /// Where the bytes are (the CDN, after the Hub's redirect), when elsewhere than the Hub.
    location: Option<String>,
}

impl HubClient {
    /// A client of `endpoint` (default: `HF_ENDPOINT`, else https://huggingface.co).
    pub(super) fn new(opts: &HubOptions, endpoint: Option<&str>) -> Self {
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| std::env::var("HF_ENDPOINT").ok().filter(|e| !e.trim().is_empty()))
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let agent = |read: Duration, redirects: u32, whole: Option<Duration>| -> Agent {
            let mut agent = AgentBuilder::new()
                .try_proxy_from_env(true)
                .timeout_connect(opts.etag_timeout)
                .timeout_read(read)
                .timeout_write(read)
                .redirects(redirects)
                .redirect_auth_headers(RedirectAuthHeaders::SameHost)
                .user_agent(&format!("sd-rbee/{}", env!("CARGO_PKG_VERSION")));
            // A server that sends a byte now and then never trips the read timeout: a small answer must also
            // come whole in time (a download only makes progress, and resumes).
            if let Some(whole) = whole {
                agent = agent.timeout(whole);
            }
            agent.build()
        };
        // (ureq reads with what is left of the whole as its read timeout: a silent Hub is still given up on
        // after the etag timeout.)
        let answer = Some(opts.etag_timeout);
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: opts.token.clone(),
            requests: agent(opts.etag_timeout, 5, answer),
            metadata: agent(opts.etag_timeout, 0, answer),
            downloads: agent(opts.download_timeout, 5, None),
            download_timeout: opts.download_timeout,
        }
    }

    /// `err`, from a request to `url`, knowing whether that request carried the token.
    fn failed(&self, url: &str, err: ureq::Error) -> HubError {
        let mut err = HubError::from_ureq(err);
        if let HubError::Http(failure) = &mut err {
            failure.token_sent = self.sends_token(url);
        }
        err
    }

    /// Whether a request to `url` carries the token: there is one, and `url` is on the Hub's own origin.
    fn sends_token(&self, url: &str) -> bool {
        self.token.is_some() && same_origin(url, &self.endpoint)
    }

    fn get(&self, agent: &Agent, url: &str) -> ureq::Request {
        let request = agent.get(url);
        match &self.token {
            Some(token) if self.sends_token(url) => request.set("Authorization", &format!("Bearer {token}")),
            _ => request,
        }
    }

    /// The repo's commit and file list at the revision (`GET /api/models/<repo>/revision/<rev>`).
    pub(super) fn repo_info(&self, cache: &CachedRepo) -> Result<RepoInfo, HubError> {
        let url = format!("{}/api/{}", self.endpoint, cache.hf_repo(&cache.revision).api_url());
        let response = self.get(&self.requests, &url).call().map_err(|e| self.failed(&url, e))?;
        // Read up to a bound (a listing of tens of thousands of files is a few MiB): the answer is held whole.
        let mut body = Vec::new();
        let read = response.into_reader().take(MAX_REPO_INFO_BYTES + 1).read_to_end(&mut body);
        read.map_err(|e| HubError::Unreachable(format!("reading the Hub's answer failed: {e}")))?;
        if body.len() as u64 > MAX_REPO_INFO_BYTES {
            return Err(HubError::TooLarge(format!("the Hub's file list is over {MAX_REPO_INFO_BYTES} bytes")));
        }
        let info = serde_json::from_slice::<RepoInfo>(&body)
            .map_err(|e| HubError::Unreachable(format!("unreadable answer from the Hub: {e}")))?;
        // It becomes a folder name in the cache.
        if info.sha.len() != 40 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HubError::Unreachable(format!(
                "the Hub's answer names commit {:?}, not a commit hash",
                info.sha
            )));
        }
        Ok(info)
    }

    /// The local path of `file` at `commit`, downloaded into the cache unless it is there; a file over
    /// `max_bytes` (when given) is refused before any of it is fetched.
    pub(super) fn download(
        &self,
        cache: &CachedRepo,
        commit: &str,
        file: &str,
        max_bytes: Option<u64>,
    ) -> Result<PathBuf, HubError> {
        self.download_noting(cache, commit, file, max_bytes).map(|(path, _)| path)
    }

    /// [`Self::download`], and whether this call fetched the file's content (false: the cache had it, at
    /// this commit or at another that shares its blob).
    pub(super) fn download_noting(
        &self,
        cache: &CachedRepo,
        commit: &str,
        file: &str,
        max_bytes: Option<u64>,
    ) -> Result<(PathBuf, bool), HubError> {
        let repo_dir = cache.repo_dir();
        let pointer = repo_dir.join("snapshots").join(commit).join(file);
        if pointer.exists() {
            return Ok((pointer, false));
        }
        let repo = cache.hf_repo(commit);
        let url = format!("{}/{}/resolve/{}/{file}", self.endpoint, repo.url(), repo.url_revision());
        let meta = self.file_meta(&url)?;
        if let Some(max) = max_bytes.filter(|&max| meta.size > max) {
            return Err(HubError::TooLarge(format!("{file} is {} bytes, over the limit of {max}", meta.size)));
        }
        let blob = repo_dir.join("blobs").join(&meta.etag);
        let local = |what: &str, path: &Path, e: std::io::Error| {
            HubError::Local(format!("cannot {what} {} in the Hugging Face cache: {e}", path.display()))
        };
        let mut fetched = false;
        if !blob.exists() {
            let blobs = blob.parent().expect("blobs/");
            std::fs::create_dir_all(blobs).map_err(|e| local("create", blobs, e))?;
            let lock = BlobLock::acquire(&blob, self.patience())?;
            if !blob.exists() {
                let part = blob.with_extension("part");
                self.fetch(meta.location.as_deref().unwrap_or(&url), &part, meta.size, file)?;
                std::fs::rename(&part, &blob).map_err(|e| local("complete", &blob, e))?;
                // The name is what says the blob is whole: the rename is made to last too.
                if let Err(e) = File::open(blobs).and_then(|dir| dir.sync_all()) {
                    tracing::debug!(error = %e, "cannot sync {}", blobs.display());
                }
                fetched = true;
            }
            drop(lock);
        }
        let folder = pointer.parent().expect("a file in the snapshot");
        std::fs::create_dir_all(folder).map_err(|e| local("create", folder, e))?;
        link(&blob, &pointer).map_err(|e| local("link", &pointer, e))?;
        Ok((pointer, fetched))
    }

    /// The file's etag and size, from a one-byte ranged request (as hf-hub and `huggingface_hub` ask).
    fn file_meta(&self, url: &str) -> Result<FileMeta, HubError> {
        let ranged =
            |u: &str| self.get(&self.metadata, u).set("Range", "bytes=0-0").call().map_err(|e| self.failed(u, e));
        let mut response = ranged(url)?;
        // The Hub redirects a renamed repo within itself (a relative location): follow those; a redirect to
        // another host (the CDN) is where the bytes are.
        let mut location = None;
        for _ in 0..5 {
            if !(300..400).contains(&response.status()) {
                break;
            }
            let Some(target) = response.header("location").map(str::to_string) else { break };
            if target.starts_with('/') {
                response = ranged(&format!("{}{target}", self.endpoint))?;
            } else {
                location = Some(target);
                break;
            }
        }
        let header = |name: &str| response.header(name).map(str::to_string);
        let missing = |name: &str| HubError::Unreachable(format!("the Hub's answer for {url} has no {name} header"));
        let etag = header("x-linked-etag").or_else(|| header("etag")).ok_or_else(|| missing("ETag"))?;
        let etag = etag.trim_start_matches("W/").replace('"', "");
        // It names a blob file, beside which `.part` and `.lock` files are kept: letters, digits, `-`, `_` only.
        if etag.is_empty() || !etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(HubError::Unreachable(format!("the Hub gave {url} an unusable ETag {etag:?}")));
        }
        let size = match header("x-linked-size") {
            Some(size) => Some(size),
            None if location.is_some() => {
                let target = location.as_deref().expect("checked");
                let at_cdn = self.get(&self.requests, target).set("Range", "bytes=0-0").call();
                let at_cdn = at_cdn.map_err(|e| self.failed(target, e))?;
                total_size(&at_cdn)
            }
            None => total_size(&response),
        };
        let size = size
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| HubError::Unreachable(format!("the Hub did not give the size of {url}")))?;
        Ok(FileMeta { etag, size, location })
    }

    /// Fills `part` up to `size` bytes from `url`, resuming from what `part` already holds; an attempt that
    /// receives nothing for the download timeout ends, and the next resumes.
    fn fetch(&self, url: &str, part: &Path, size: u64, file: &str) -> Result<(), HubError> {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(|e| HubError::Local(format!("cannot write {}: {e}", part.display())))?;
        let progress = indicatif::ProgressBar::new(size).with_message(file.to_string());
        progress.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("a valid template"),
        );
        let mut fruitless = 0;
        let outcome = loop {
            let have = out.metadata().map(|m| m.len()).unwrap_or(0);

            if have > size {
                // Not a prefix of this file: start again.
                out.set_len(0).map_err(|e| HubError::Local(format!("cannot write {}: {e}", part.display())))?;
                continue;
            }
            if have == size {
                break synced(&out, part);
            }
            progress.set_position(have);
            let attempt = self.fetch_from(url, have, size, &mut out, &progress);
            let now = out.metadata().map(|m| m.len()).unwrap_or(have);
            let err = match attempt {
                Ok(()) if now == size => break synced(&out, part),
                Ok(()) => format!("the connection ended after {now} of {size} bytes"),
                Err(HubError::Http(failure)) if !failure.is_transient() => break Err(HubError::Http(failure)),
                Err(e @ (HubError::Local(_) | HubError::TooLarge(_))) => break Err(e),
                Err(HubError::Http(failure)) => format!("the Hub answered HTTP {}", failure.status),
                Err(HubError::Unreachable(e)) => e,
            };
            fruitless = if now > have { 1 } else { fruitless + 1 };
            if fruitless >= STALLED_ATTEMPTS {
                break Err(HubError::Unreachable(format!(
                    "{err}; {fruitless} attempts in a row received nothing (HF_HUB_DOWNLOAD_TIMEOUT is {}); {now} of {size} bytes are kept to resume from",
                    humantime::format_duration(self.download_timeout)
                )));
            }
            tracing::warn!(file, received = now, size, error = %err, "the download was interrupted; resuming");
            std::thread::sleep(self.download_timeout.min(Duration::from_secs(1)));
        };
        progress.finish_and_clear();
        outcome
    }

    /// One attempt: asks for the bytes from `from` on and appends what comes to `out`, never past `size` (a
    /// server that sends more than it said would otherwise fill the disk, or make every attempt start over).
    fn fetch_from(
        &self,
        url: &str,
        from: u64,
        size: u64,
        out: &mut File,
        progress: &indicatif::ProgressBar,
    ) -> Result<(), HubError> {
        let response = self
            .get(&self.downloads, url)
            .set("Range", &format!("bytes={from}-"))
            .call()
            .map_err(|e| self.failed(url, e))?;
        let resumed_at = response.header("content-range").and_then(range_start);
        let from = if from > 0 && (response.status() != 206 || resumed_at == Some(0)) {
            // The range was not honoured: the body is the whole file.
            out.set_len(0).map_err(|e| HubError::Local(e.to_string()))?;
            0
        } else if from > 0 && resumed_at != Some(from) {
            // Bytes from elsewhere in the file, appended here, would make a file of the right size and wrong
            // content: start again from the beginning.
            out.set_len(0).map_err(|e| HubError::Local(e.to_string()))?;
            return Err(HubError::Unreachable(format!(
                "asked for bytes from {from}, the answer starts at {resumed_at:?}"
            )));
        } else {
            from
        };
        let mut reader = response.into_reader().take(size.saturating_sub(from));
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(HubError::Unreachable(format!("reading the download failed: {e}"))),
            };
            out.write_all(&buffer[..n]).map_err(|e| HubError::Local(format!("cannot write the download: {e}")))?;
            progress.inc(n as u64);
        }
    }

    /// How long to wait for another download of the same file, here or in another process, while it
    /// receives nothing: longer than that download can go without data before it fails.
    fn patience(&self) -> Duration {
        (self.download_timeout + Duration::from_secs(1)) * (STALLED_ATTEMPTS + 1)
    }
}

/// Makes the whole of `part` last on the disk before the blob is named after it: a crash must not leave a
/// short file under that name, which is taken for whole.
fn synced(out: &File, part: &Path) -> Result<(), HubError> {
    out.sync_all().map_err(|e| HubError::Local(format!("cannot write {}: {e}", part.display())))
}

/// The most of a repo's file list read from the Hub.
const MAX_REPO_INFO_BYTES: u64 = 32 << 20;

/// Where a ranged answer starts: `START` of `Content-Range: bytes START-END/SIZE`.
fn range_start(range: &str) -> Option<u64> {
    range.trim().strip_prefix("bytes ")?.split_once('-')?.0.trim().parse().ok()
}

/// The file's whole size from a ranged answer: `Content-Range: bytes 0-0/<size>`, else (range ignored) its
/// `Content-Length`.
fn total_size(response: &ureq::Response) -> Option<String> {
    match response.header("content-range") {
        Some(range) => range.rsplit('/').next().map(str::to_string),
        None => response.header("content-length").map(str::to_string),
    }
}

/// A relative link from the snapshot to the blob, as hf-hub makes (a copy where links cannot be made).
fn link(blob: &Path, pointer: &Path) -> std::io::Result<()> {
    if pointer.exists() {
        return Ok(());
    }
    // A link to a blob that is gone (deleted by `hub::lora_cache` in another process while this one
    // downloaded): replaced, or it would stand in the way of every download of this file.
    if pointer.symlink_metadata().is_ok() {
        std::fs::remove_file(pointer)?;
    }
    let depth = pointer.strip_prefix(blob.parent().and_then(Path::parent).expect("<repo>/blobs/<etag>"));
    let ups = depth.map(|d| d.components().count() - 1).unwrap_or(0);
    let target: PathBuf = std::iter::repeat_n(Path::new(".."), ups)
        .collect::<PathBuf>()
        .join("blobs")
        .join(blob.file_name().expect("a blob file"));
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&target, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = target;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

/// The lock hf-hub takes on `<blob>.lock` while it downloads the blob: one download of a file at a time, across
/// threads and processes. Released when dropped.
struct BlobLock {
    file: File,
}

impl BlobLock {
    /// Waits for the lock while the download holding it makes progress (its `.part` file grows); gives up
    /// after `patience` without progress.
    fn acquire(blob: &Path, patience: Duration) -> Result<Self, HubError> {
        let path = blob.with_extension("lock");
        let file = File::create(&path)
            .map_err(|e| HubError::Local(format!("cannot create {} in the Hugging Face cache: {e}", path.display())))?;
        let part = blob.with_extension("part");
        let size = || std::fs::metadata(&part).map(|m| m.len()).ok();
        let (mut seen, mut since) = (size(), Instant::now());
        loop {
            if try_lock(&file) {
                return Ok(Self { file });
            }
            if size() != seen {
                (seen, since) = (size(), Instant::now());
            } else if since.elapsed() > patience {
                return Err(HubError::Unreachable(format!(
                    "another download of {} holds {} and has received nothing for {}",
                    blob.display(),
                    path.display(),
                    humantime::format_duration(patience)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(unix)]
pub(super) fn try_lock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows for the call.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(not(unix))]
pub(super) fn try_lock(_file: &File) -> bool {
    true
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: as in try_lock.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

/// Whether `url` is on the same scheme, host and port as `endpoint` (a text prefix is not: the token would
/// go to `https://huggingface.co.example.net/` and `https://huggingface.co@example.net/`).
fn same_origin(url: &str, endpoint: &str) -> bool {
    match (url::Url::parse(url), url::Url::parse(endpoint)) {
        (Ok(url), Ok(endpoint)) => url.origin().is_tuple() && url.origin() == endpoint.origin(),
        _ => false,
    }
}

#[cfg(test)]
#[path = "tests/transfer.rs"]
mod tests;
