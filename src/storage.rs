//! Where results (and uploaded inputs) live: one object store named by a URL, through the `object_store`
//! crate.
//!
//! | URL | store | configuration |
//! | --- | --- | --- |
//! | `file:///var/lib/sd-rbee` or a plain path | a local folder (the embedded default) | none |
//! | `s3://bucket[/prefix]` | S3, MinIO, any S3-compatible server | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint |
//! | `gs://bucket[/prefix]` | Google Cloud Storage | `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_APPLICATION_CREDENTIALS` |
//! | `az://container[/prefix]` | Azure Blob Storage | `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, ... |
//! | `memory://` | in process memory (tests) | none |
//!
//! Keys are the protocol's (`jobs/<job_id>/<n>.png`), relative to the URL's prefix. Transient errors
//! (connection refused, 5xx, timeouts) are retried with backoff for up to [`StoreOptions::retry_timeout`]
//! before an operation fails.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// What the services answer (in the error's text) for a bucket or container that does not exist.
const MISSING_BUCKET: &[&str] = &["NoSuchBucket", "ContainerNotFound", "bucket does not exist"];
/// ... and for credentials they do not accept (as opposed to a permission the credentials lack).
const BAD_CREDENTIALS: &[&str] = &[
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "AuthenticationFailed",
    "RequestTimeTooSkewed",
];
/// Whether an error's text (object_store's, which carries the service's answer) gives one of
/// [`BAD_CREDENTIALS`] as the service's error code. Only as a code: the text also holds the key, which is
/// anyone's, and a key named after a code must not read as one.
fn refuses_credentials(text: &str) -> bool {
    BAD_CREDENTIALS.iter().any(|c| text.contains(&format!("<Code>{c}</Code>")) || text.contains(&format!("\"{c}\"")))
}

const ACCESS_DENIED: &str =
    "access denied; check the credentials (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)";

/// How a [`Store`] behaves.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long one operation keeps retrying transient errors.
    pub retry_timeout: Duration,
    /// Lifetime of presigned GET URLs (S3, GCS, Azure); `None`: no URLs.
    pub presign_ttl: Option<Duration>,
    /// The S3 endpoint presigned URLs name, when their readers reach the store at another address than this
    /// process does (in `compose.yaml` the workers write to `http://minio:9000`, which the host cannot
    /// resolve, and the URLs must say `http://127.0.0.1:9000`). Signing needs no connection.
    pub presign_endpoint: Option<String>,
    /// Settings of the cloud store given here rather than in the process environment (which is read first):
    /// `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_KEY`... as
    /// `object_store` names them (case-insensitive). An embedding program (or a test) sets credentials here
    /// without touching the environment of its other threads.
    pub settings: Vec<(String, String)>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            retry_timeout: Duration::from_secs(30),
            presign_ttl: Some(Duration::from_secs(24 * 60 * 60)),
            presign_endpoint: None,
            settings: Vec::new(),
        }
    }
}

/// Applies `settings` to a cloud store builder, naming a setting it does not know.
fn configure<B, K>(mut builder: B, settings: &[(String, String)], with: impl Fn(B, K, &str) -> B) -> anyhow::Result<B>
where
    K: std::str::FromStr,
{
    for (name, value) in settings {
        let key: K =
            name.to_ascii_lowercase().parse().map_err(|_| anyhow::anyhow!("unknown store setting {name:?}"))?;
        builder = with(builder, key, value);
    }
    Ok(builder)
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object {key} not found in {store}")]
    NotFound { key: String, store: String },
    /// The store cannot hold such a key (a file store: a segment too long for a file name, a segment that
    /// is a file where a folder is needed). Retrying does not help; it is the caller's error.
    #[error("{store} cannot hold the key {}: {reason}", crate::protocol::quoted(key))]
    InvalidKey { key: String, store: String, reason: String },
    /// The store refused access to the key. S3 answers so for a missing object too when the credentials
    /// cannot list the bucket: for a key a job names, the job's error, not an outage to retry.
    #[error("{store} refused to {op} {}: access denied (it may not exist)", crate::protocol::quoted(key))]
    Denied { op: &'static str, key: String, store: String },
    /// The object is larger than the reader accepts.
    #[error("object {} is {size} bytes, over the limit of {max}", crate::protocol::quoted(key))]
    TooLarge { key: String, size: u64, max: u64 },
    #[error("{op} {key} in {store} failed: {source}")]
    Failed {
        op: &'static str,
        key: String,
        store: String,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    /// The object is not there, or the store will not say ([`StoreError::Denied`]: S3's answer for a missing
    /// key to credentials that cannot list the bucket).
    pub fn is_missing(&self) -> bool {
        matches!(self, StoreError::NotFound { .. } | StoreError::Denied { .. })
    }
}

/// An object store and the key prefix inside it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    prefix: String,
    url: String,
    presign_ttl: Option<Duration>,
    /// Whether objects carry a content type (the local file system keeps none).
    content_types: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

fn retry_config(timeout: Duration) -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: usize::MAX,
        retry_timeout: timeout,
    }
}

impl Store {
    /// Opens the store named by `url` (see the module documentation).
    pub fn open(url: &str, opts: &StoreOptions) -> anyhow::Result<Self> {
        let url_text = url.trim();
        if url_text.is_empty() {
            bail!("the store URL is empty (use file:///path, s3://bucket, gs://bucket, az://container or memory://)");
        }
        if opts.presign_endpoint.is_some() && !(url_text.starts_with("s3://") || url_text.starts_with("s3a://")) {
            bail!("a presign endpoint applies to S3 stores only, not to {url_text}");
        }
        if !url_text.contains("://") {
            return Self::local(std::path::Path::new(url_text), url_text, opts);
        }
        let parsed = url::Url::parse(url_text).with_context(|| format!("store URL {url_text:?} is not a URL"))?;
        // Credentials come from the environment; ones in the URL would be ignored, and
        // repeated in every storage error the API and the events carry.
        if !parsed.username().is_empty() || parsed.password().is_some() {
            bail!(
                "the store URL holds a user name or password, which sd-rbee does not use (and would show in its \
                 errors): give credentials in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)"
            );
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            bail!("the store URL {url_text:?} has a query or fragment, which sd-rbee does not use: leave it out");
        }
        let prefix = parsed.path().trim_matches('/').to_string();
        let retry = retry_config(opts.retry_timeout);
        let (inner, signer): (Arc<dyn ObjectStore>, Option<Arc<dyn Signer>>) = match parsed.scheme() {
            "file" => {
                let path =
                    parsed.to_file_path().map_err(|_| anyhow::anyhow!("store URL {url_text:?} is not a local path"))?;
                return Self::local(&path, url_text, opts);
            }
            "memory" => (Arc::new(object_store::memory::InMemory::new()), None),
            "s3" | "s3a" => {
                let bucket = parsed.host_str().filter(|b| !b.is_empty()).context("s3:// URL without a bucket")?;
                let builder = || -> anyhow::Result<_> {
                    let s3 = object_store::aws::AmazonS3Builder::from_env();
                    Ok(configure(s3, &opts.settings, |b, k, v| b.with_config(k, v))?
                        .with_bucket_name(bucket)
                        .with_retry(retry.clone()))
                };
                let s3 = Arc::new(builder()?.build().with_context(|| format!("cannot configure S3 store {url_text}"))?);
                let signer: Arc<dyn Signer> = match &opts.presign_endpoint {
                    Some(endpoint) => {
                        let parsed = url::Url::parse(endpoint).ok().filter(|u| matches!(u.scheme(), "http" | "https"));
                        if parsed.is_none_or(|u| u.host_str().is_none()) {
                            bail!("the presign endpoint {endpoint:?} is not an http:// or https:// URL");
                        }
                        let public = builder()?.with_endpoint(endpoint);
                        let public = public.with_allow_http(endpoint.starts_with("http://"));
                        Arc::new(public.build().with_context(|| format!("cannot presign for {endpoint}"))?)
                    }
                    None => s3.clone(),
                };
                (s3, Some(signer))
            }
            "gs" => {
                let bucket = parsed.host_str().context("gs:// URL without a bucket")?;
                let gcs = object_store::gcp::GoogleCloudStorageBuilder::from_env();
                let gcs = configure(gcs, &opts.settings, |b, k, v| b.with_config(k, v))?
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .build()
                    .with_context(|| format!("cannot configure GCS store {url_text}"))?;
                let gcs = Arc::new(gcs);
                (gcs.clone(), Some(gcs))
            }
            "az" | "azure" | "abfs" => {
                let container = parsed.host_str().context("az:// URL without a container")?;
                let az = object_store::azure::MicrosoftAzureBuilder::from_env();
                let az = configure(az, &opts.settings, |b, k, v| b.with_config(k, v))?
                    .with_container_name(container)
                    .with_retry(retry)
                    .build()
                    .with_context(|| format!("cannot configure Azure store {url_text}"))?;
                let az = Arc::new(az);
                (az.clone(), Some(az))
            }
            other => bail!("store URL scheme {other:?} is not supported (use file, s3, gs, az or memory)"),
        };
        let content_types = true;
        Ok(Self { inner, signer, prefix, url: url_text.to_string(), presign_ttl: opts.presign_ttl, content_types })
    }

    fn local(path: &std::path::Path, url: &str, opts: &StoreOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("cannot create store folder {}", path.display()))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
            .with_context(|| format!("cannot open store folder {}", path.display()))?
            .with_automatic_cleanup(true)
            // A job is acknowledged once its images are stored: on a disk that means synced, as an object
            // store's answer means (else a power cut after the ack can leave a completed job's file empty).
            .with_fsync(true);
        let _ = opts;
        Ok(Self {
            inner: Arc::new(fs),
            signer: None,
            prefix: String::new(),
            url: url.to_string(),
            presign_ttl: None,
            content_types: false,
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn failed(&self, op: &'static str, key: &str, source: object_store::Error) -> StoreError {
        let bad_credentials = || refuses_credentials(&source.to_string());
        match source {
            object_store::Error::NotFound { .. } => StoreError::NotFound { key: key.into(), store: self.url.clone() },
            // Credentials the store does not accept (or a clock it finds skewed) are the worker's outage.
            object_store::Error::PermissionDenied { .. } if !bad_credentials() => {
                StoreError::Denied { op, key: key.into(), store: self.url.clone() }
            }
            object_store::Error::InvalidPath { source } => {
                StoreError::InvalidKey { key: key.into(), store: self.url.clone(), reason: source.to_string() }
            }
            source => match key_refused_by_file_system(&source) {
                Some(reason) => StoreError::InvalidKey { key: key.into(), store: self.url.clone(), reason },
                None => StoreError::Failed { op, key: key.into(), store: self.url.clone(), source },
            },
        }
    }

    /// Writes `bytes` at `key` (replacing what was there: writes are idempotent).
    pub async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<(), StoreError> {
        let mut attrs = object_store::Attributes::new();
        if self.content_types {
            attrs.insert(object_store::Attribute::ContentType, content_type.to_string().into());
        }
        let opts = object_store::PutOptions { attributes: attrs, ..Default::default() };
        self.inner
            .put_opts(&self.path(key), PutPayload::from_bytes(bytes), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.failed("put", key, e))
    }

    /// Deletes the object at `key`; one that is not there is no error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.inner.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("delete", key, e)),
        }
    }

    /// Reads the whole object at `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self.inner.get(&self.path(key)).await.map_err(|e| self.failed("get", key, e))?;
        result.bytes().await.map_err(|e| self.failed("get", key, e))
    }

    /// The object at `key` as a stream of its bytes, with its size: what serves it does not hold it whole.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<(u64, futures::stream::BoxStream<'static, std::io::Result<Bytes>>), StoreError> {
        use futures::{StreamExt, TryStreamExt};
        let result = self.inner.get(&self.path(key)).await.map_err(|e| self.failed("get", key, e))?;
        Ok((result.meta.size, result.into_stream().map_err(std::io::Error::other).boxed()))
    }

    /// Reads the object at `key` if it is at most `max` bytes; a larger one is [`StoreError::TooLarge`]
    /// without being read (an input image key may name any object in the bucket).
    pub async fn get_at_most(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        match self.size(key).await? {
            None => Err(StoreError::NotFound { key: key.into(), store: self.url.clone() }),
            Some(size) if size > max => Err(StoreError::TooLarge { key: key.into(), size, max }),
            // An empty range is refused as inconsistent (by S3 and the local store alike), which would read as
            // an outage and be retried: an empty object is empty, for the caller to refuse.
            Some(0) => Ok(Bytes::new()),
            // A ranged read: an object replaced by a larger one in between is still read only this far.
            Some(size) => self.inner.get_range(&self.path(key), 0..size).await.map_err(|e| self.failed("get", key, e)),
        }
    }

    /// The size of the object at `key`, `None` if there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.head_failed(key, e).await),
        }
    }

    /// Why a HEAD of `key` failed. Its answer has no body to say why access was denied, so a refusal is
    /// asked again with a one-byte GET, whose answer tells a missing or forbidden object
    /// ([`StoreError::Denied`]) from credentials the store does not accept.
    async fn head_failed(&self, key: &str, head: object_store::Error) -> StoreError {
        if !matches!(head, object_store::Error::PermissionDenied { .. }) {
            return self.failed("head", key, head);
        }
        match self.inner.get_range(&self.path(key), 0..1).await {
            Err(e) => self.failed("head", key, e),
            // Readable after all: not the caller's error.
            Ok(_) => StoreError::Failed { op: "head", key: key.into(), store: self.url.clone(), source: head },
        }
    }

    /// The object's size and version (its ETag, else its modification time), `None` if there is none: what
    /// tells a cached copy from a replaced object.
    pub async fn stamp(&self, key: &str) -> Result<Option<(u64, String)>, StoreError> {
        match self.inner.head(&self.path(key)).await {
            Ok(meta) => Ok(Some((meta.size, meta.e_tag.unwrap_or_else(|| meta.last_modified.to_rfc3339())))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.head_failed(key, e).await),
        }
    }

    /// The keys under `prefix` (which ends with `/`), relative to it, sorted, at most `max` (the first
    /// `max` in order; however many there are, no more than `max` are held at once).
    pub async fn list(&self, prefix: &str, max: usize) -> Result<Vec<String>, StoreError> {
        use futures::TryStreamExt;
        let base = self.path(prefix.trim_end_matches('/'));
        let mut listing = self.inner.list(Some(&base));
        // The `max` smallest keys so far, the largest on top.
        let mut first = std::collections::BinaryHeap::with_capacity(max.min(1024) + 1);
        while let Some(meta) = listing.try_next().await.map_err(|e| self.failed("list", prefix, e))? {
            let key = meta.location.as_ref().strip_prefix(base.as_ref()).unwrap_or("").trim_start_matches('/');
            if first.len() < max {
                first.push(key.to_string());
            } else if first.peek().is_some_and(|largest: &String| key < largest.as_str()) {
                first.pop();
                first.push(key.to_string());
            }
        }
        Ok(first.into_sorted_vec())
    }

    /// Reads an object that need not exist, so that a wrong key, a missing bucket or an unreachable endpoint
    /// is found when a process starts rather than at its first job. Transient errors are retried for
    /// [`StoreOptions::retry_timeout`] first, like every operation.
    pub async fn check(&self) -> anyhow::Result<()> {
        let probe = ".sd-rbee-probe";
        let error = match self.inner.get(&self.path(probe)).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        // object_store's message carries the service's answer (its error code).
        let text = error.to_string();
        let names = |codes: &[&str]| codes.iter().any(|c| text.contains(c));
        match error {
            object_store::Error::NotFound { .. } if names(MISSING_BUCKET) || self.missing_bucket().await => {
                bail!("{}: the bucket or container does not exist", self.url)
            }
            object_store::Error::NotFound { .. } => Ok(()),
            object_store::Error::Unauthenticated { .. } => bail!("{}: {ACCESS_DENIED}: {text}", self.url),
            object_store::Error::PermissionDenied { .. } if refuses_credentials(&text) => {
                bail!("{}: {ACCESS_DENIED}: {text}", self.url)
            }
            object_store::Error::PermissionDenied { .. } => {
                // S3 answers 403 for a missing object to a key that may not list the bucket; such a key may
                // still read and write objects, which is all sd-rbee needs.
                tracing::warn!(store = %self.url, "the store refused to say whether {probe} exists: {text}");
                Ok(())
            }
            // Without credentials in the environment, object_store asks the cloud's instance metadata service,
            // which off the cloud does not answer: say what is missing rather than how the fallback failed.
            _ if self.url.starts_with("s3")
                && (text.contains("169.254.169.254") || text.contains("/latest/api/token")) =>
            {
                bail!(
                "{}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a \
                 store other than AWS), or run where an instance role provides them (the instance metadata service \
                 did not answer: {text})",
                self.url
            )
            }
            _ => bail!("{}: {text}", self.url),
        }
    }

    /// Whether listing says the bucket is missing (some servers answer a missing bucket's objects with
    /// NoSuchKey). A key that may not list is no reason to refuse the store.
    async fn missing_bucket(&self) -> bool {
        use futures::StreamExt;
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        match self.inner.list(prefix.as_ref()).next().await {
            Some(Err(object_store::Error::NotFound { .. })) => true,
            // object_store reports a listing's 404 as a generic error; the services name the case.
            Some(Err(e)) => MISSING_BUCKET.iter().any(|c| e.to_string().contains(c)),
            _ => false,
        }
    }

    /// A presigned GET URL for `key`, when the store can make one and URLs are enabled, valid no later than
    /// `until` (Unix milliseconds, a job's expiry; rounded down to the second): `None` once it has passed.
    pub async fn presigned_get(&self, key: &str, until: Option<u64>) -> Option<String> {
        let (signer, mut ttl) = (self.signer.as_ref()?, self.presign_ttl?);
        if let Some(until) = until {
            let left = Duration::from_secs(until.saturating_sub(crate::protocol::now_millis()) / 1000);
            if left.is_zero() {
                return None;
            }
            ttl = ttl.min(left);
        }
        match signer.signed_url(object_store::signer::Method::GET, &self.path(key), ttl).await {
            Ok(url) => Some(url.to_string()),
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot presign a URL");
                None
            }
        }
    }
}

/// What a local file system says of a key it cannot hold as a path (as opposed to a disk or permission
/// problem), found in the error's causes.
fn key_refused_by_file_system(error: &object_store::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let refused = matches!(
                io.raw_os_error(),
                Some(libc::ENAMETOOLONG | libc::EINVAL | libc::EILSEQ | libc::ENOTDIR | libc::EISDIR)
            );
            return refused.then(|| io.to_string());
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests;
