//! How to reach the Hub and where its cache is ([`HubOptions`]), read from the environment the
//! way `huggingface_hub` does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::Cache;

/// How to reach the Hub and where its cache is.
#[derive(Clone, PartialEq)]
pub struct HubOptions {
    /// Never touch the network; use only what is in the cache.
    pub offline: bool,
    /// The hub cache folder (the one holding `models--owner--name`); `None`: hf-hub's default
    /// (`$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Access token for gated or private repos.
    pub token: Option<String>,
    /// Fetch the `.fp16.safetensors` weight variants where a repo has them (half the download;
    /// the loader converts to the compute dtype anyway).
    pub prefer_fp16: bool,
    /// The longest wait for the Hub to connect or answer a request (`HF_HUB_ETAG_TIMEOUT`, as in
    /// `huggingface_hub`; 10 s). A Hub that does not answer in time counts as unreachable: the cache stands in.
    pub etag_timeout: Duration,
    /// The longest a download may go without receiving data (`HF_HUB_DOWNLOAD_TIMEOUT`; 10 s); it then
    /// resumes where it stopped, a few times, before failing.
    pub download_timeout: Duration,
}

/// `huggingface_hub`'s default for both timeouts.
pub const DEFAULT_HUB_TIMEOUT: Duration = Duration::from_secs(10);

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("offline", &self.offline)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("prefer_fp16", &self.prefer_fp16)
            .field("etag_timeout", &self.etag_timeout)
            .field("download_timeout", &self.download_timeout)
            .finish()
    }
}

impl HubOptions {
    /// Options from the environment, as `huggingface_hub` reads it: `HF_HUB_OFFLINE` (1, true,
    /// yes, on), the cache at `HF_HUB_CACHE`, else `$HF_HOME/hub` (hf-hub's rule), else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; the token from
    /// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`, the file
    /// `huggingface-cli login` writes); the timeouts from `HF_HUB_ETAG_TIMEOUT` and `HF_HUB_DOWNLOAD_TIMEOUT`
    /// (seconds). `prefer_fp16` starts true.
    pub fn from_env() -> Self {
        Self::from_vars(|key| std::env::var(key).ok())
    }

    /// [`HubOptions::from_env`] with the variables read through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        let home = var("HOME").map(PathBuf::from);
        let expand = |value: String| -> PathBuf {
            match (value.strip_prefix("~/"), &home) {
                (Some(rest), Some(home)) => home.join(rest),
                _ if value == "~" => home.clone().unwrap_or_else(|| PathBuf::from(&value)),
                _ => PathBuf::from(value),
            }
        };
        let offline = var("HF_HUB_OFFLINE").or_else(|| var("TRANSFORMERS_OFFLINE")).is_some_and(|v| is_true(&v));
        let hf_home = var("HF_HOME").map(expand).or_else(|| {
            let cache = var("XDG_CACHE_HOME").map(expand).or_else(|| home.as_ref().map(|h| h.join(".cache")))?;
            Some(cache.join("huggingface"))
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")));
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).map(|t| t.trim().to_string()).or_else(
            || match var("HF_TOKEN_PATH") {
                Some(path) => read_token_file(&expand(path)),
                // hf-hub's own lookup: the `token` file beside the `hub` folder.
                None => hf_home.as_ref().and_then(|h| Cache::new(h.join("hub")).token()),
            },
        );
        let timeout = |key: &str| match var(key).map(|v| (v.trim().parse::<f64>(), v)) {
            None => DEFAULT_HUB_TIMEOUT,
            Some((Ok(secs), _)) if secs > 0.0 && secs.is_finite() => Duration::from_secs_f64(secs),
            Some((_, text)) => {
                tracing::warn!("{key}={text:?} is not a number of seconds above 0; using 10");
                DEFAULT_HUB_TIMEOUT
            }
        };
        Self {
            offline,
            cache_dir,
            token,
            prefer_fp16: true,
            etag_timeout: timeout("HF_HUB_ETAG_TIMEOUT"),
            download_timeout: timeout("HF_HUB_DOWNLOAD_TIMEOUT"),
        }
    }

    /// The hub cache folder in use.
    pub fn cache_root(&self) -> PathBuf {
        match &self.cache_dir {
            Some(dir) => dir.clone(),
            None => Cache::from_env().path().clone(),
        }
    }
}

fn is_true(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

fn read_token_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}
