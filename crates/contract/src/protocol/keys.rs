//! The object-store key layout of results: `jobs/<job_id>/<index>.<ext>`.

use uuid::Uuid;

use super::error::{quoted, ProtocolError};
use super::{ImageResult, RESULTS_PREFIX};
use crate::vocab::ImageFormat;

/// `jobs/<job_id>/`: where a job's results are stored.
pub fn result_prefix(job_id: Uuid) -> String {
    format!("{RESULTS_PREFIX}{job_id}/")
}

/// `checkpoints/<job_id>.safetensors`: a running job's last checkpoint, from which another delivery of it
/// continues; deleted when the job ends.
pub fn resume_key(job_id: Uuid) -> String {
    format!("checkpoints/{job_id}.safetensors")
}

/// `jobs/<job_id>/<index>.<ext>`: the key of a job's result image.
pub fn result_key(job_id: Uuid, index: u32, ext: &str) -> String {
    format!("{RESULTS_PREFIX}{job_id}/{index}.{ext}")
}

/// `jobs/<job_id>/completed.msgpack`: where a finished job's `completed` event is kept, beside its images
/// (MessagePack, like on the bus). Its presence means every image of the job is stored.
pub fn manifest_key(job_id: Uuid) -> String {
    format!("{}completed.msgpack", result_prefix(job_id))
}

/// The parts of a result key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultKey {
    pub job_id: Uuid,
    pub index: u32,
    pub ext: String,
}

/// Parses a key made by [`result_key`]; anything else (another layout, a non-canonical UUID or index, an
/// extension that is not 1–8 ASCII letters or digits) is an error naming the key.
pub fn parse_result_key(key: &str) -> Result<ResultKey, ProtocolError> {
    let bad = || {
        ProtocolError::invalid(
            "key",
            format!("{} is not a result key (expected jobs/<job_id>/<index>.<ext>)", quoted(key)),
        )
    };
    let rest = key.strip_prefix(RESULTS_PREFIX).ok_or_else(bad)?;
    let (id, file) = rest.split_once('/').ok_or_else(bad)?;
    let (index, ext) = file.split_once('.').ok_or_else(bad)?;
    let job_id = Uuid::try_parse(id).map_err(|_| bad())?;
    if job_id.to_string() != id {
        return Err(bad());
    }
    let canonical_index =
        !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) && (index == "0" || !index.starts_with('0'));
    let index: u32 = if canonical_index { index.parse().map_err(|_| bad())? } else { return Err(bad()) };
    if ext.is_empty() || ext.len() > 8 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad());
    }
    Ok(ResultKey { job_id, index, ext: ext.to_string() })
}

/// Whether `image` is what a worker stores as job `job_id`'s result: under that job's result key for its own
/// index, with the extension and the content type of one image format. Anyone on the bus can publish events,
/// and a cached result names an earlier job's images: an image that is not so is never kept, read or served
/// under a job's name, or any other object of the store (an upload, a LoRA) could be.
pub fn is_result_of(image: &ImageResult, job_id: Uuid) -> bool {
    parse_result_key(&image.key).is_ok_and(|key| {
        key.job_id == job_id
            && key.index == image.index
            && [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp]
                .iter()
                .any(|f| f.extension() == key.ext && f.content_type() == image.content_type)
    })
}
