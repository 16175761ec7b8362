//! What the OpenAI and AUTOMATIC1111 endpoints share: the model a request runs on, input images too large
//! to travel inside a job message, and submitting a job then waiting for its images.

use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiResult;
use super::streams::StreamSlot;
use super::{AppError, AppState};
use crate::api::openai::OPENAI_MODEL_NAMES;
use crate::api::{ImageInput, JobSubmission};
use crate::queen::completion::Finished;

/// The model a compatible request runs on: the one it names, unless it names none or one of OpenAI's; then
/// the queen's `--compat-model`, else the only model of the catalogue. `field` is what the caller calls it.
pub(super) async fn choose_model(state: &AppState, asked: Option<String>, field: &str) -> ApiResult<String> {
    if let Some(model) = asked.filter(|m| !m.is_empty() && !OPENAI_MODEL_NAMES.contains(&m.as_str())) {
        return Ok(model);
    }
    if let Some(model) = &state.config.compat_model {
        return Ok(model.clone());
    }
    match state.jobs.catalogue().await.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(AppError::invalid(field, "no model is served yet; name one")),
        several => {
            let several = crate::queen::submit::first_ten(several);
            Err(AppError::invalid(field, format!("name one of {several} (no --compat-model default)")))
        }
    }
}

/// An error about a native field, named as the client calls it (`n` for `num_images`), the message saying
/// which of theirs it is about.
pub(super) fn in_their_words(mut e: AppError, names: &[(&str, &str)]) -> AppError {
    crate::api::in_their_words(&mut e.field, &mut e.message, names);
    e
}

/// The inputs a compatible request stored under `uploads/` for its job: deleted when the request ends
/// before the job goes to be submitted (refused, or failed on the way), so that nothing is left that no job
/// names.
#[derive(Default)]
pub(super) struct StoredInputs(Option<Stored>);

/// Stored inputs, to delete.
struct Stored {
    store: crate::storage::Store,
    keys: Vec<String>,
}

impl Stored {
    async fn delete(self) {
        for key in self.keys {
            if let Err(e) = self.store.delete(&key).await {
                tracing::warn!(key, error = %e, "cannot delete the input of a request that was not submitted");
            }
        }
    }
}

impl StoredInputs {
    fn add(&mut self, store: &crate::storage::Store, key: String) {
        self.0.get_or_insert_with(|| Stored { store: store.clone(), keys: Vec::new() }).keys.push(key);
    }

    /// Them, no longer deleted on drop: a submission under way may queue the job that names them.
    fn disarm(&mut self) -> Option<Stored> {
        self.0.take()
    }
}

impl Drop for StoredInputs {
    /// (A request that ends on the way, an error returned with `?`: deleted in the background.)
    fn drop(&mut self) {
        if let Some(stored) = self.0.take() {
            tokio::spawn(stored.delete());
        }
    }
}

/// An input image as the job carries it: inline while small, else stored with the caller's uploads (listed in
/// `stored`) and named by key. These clients cannot upload first as the native API asks, and a job message
/// must fit the bus's limit (1 MiB by default): an image and a mask of a quarter of it each, in base64, leave
/// room for the rest.
pub(super) async fn carried(
    state: &AppState,
    caller: &Caller,
    bytes: Vec<u8>,
    field: &str,
    stored: &mut StoredInputs,
) -> ApiResult<ImageInput> {
    use base64::Engine as _;
    if bytes.len() <= state.jobs.max_message_bytes() / 4 {
        return Ok(ImageInput::Base64(base64::engine::general_purpose::STANDARD.encode(&bytes)));
    }
    let upload = state.jobs.store_input(bytes.into(), field, field, &caller.scope).await?;
    stored.add(&state.jobs.store, upload.object_key.clone());
    Ok(ImageInput::Upload { object_key: upload.object_key })
}

/// [`carried`] for an image the request gave in base64 (a `data:` URL or plain).
pub(super) async fn carried_base64(
    state: &AppState,
    caller: &Caller,
    text: String,
    field: &str,
    stored: &mut StoredInputs,
) -> ApiResult<ImageInput> {
    if text.len() <= state.jobs.max_message_bytes() / 3 {
        return Ok(ImageInput::Base64(text));
    }
    let bytes = crate::api::decode_base64(&text, field).map_err(|e| AppError::invalid(field, e))?;
    carried(state, caller, bytes, field, stored).await
}

/// Submits `job` as `caller` and waits for its images (`--compat-wait` at most), holding `slot`, one of the
/// caller's streams (taken before its images were carried: a caller at its cap stores nothing), meanwhile.
/// `submitted` hears the job's id first. A job refused names its field as the client calls it (`names`:
/// native to theirs), and its `stored` inputs are deleted. Once the job is submitted, every error names the
/// job and tells clients not to retry on their own: a retry would be a second job.
pub(super) async fn submit_and_wait(
    state: &AppState,
    caller: &Caller,
    (slot, mut stored): (Option<StreamSlot>, StoredInputs),
    job: JobSubmission,
    names: &[(&str, &str)],
    submitted: impl FnOnce(Uuid),
) -> ApiResult<Finished> {
    let _slot = slot;
    // From here the job may be queued even if this request goes (the submission runs apart): its inputs are
    // deleted only when it is refused.
    let inputs = stored.disarm();
    let job_id = match caller.submit(state, job, None).await {
        Ok(submitted) => submitted.job_id,
        Err(e) => {
            if let Some(inputs) = inputs {
                inputs.delete().await;
            }
            return Err(in_their_words(e, names));
        }
    };
    submitted(job_id);
    state
        .jobs
        .finished(job_id, state.config.compat_wait, &state.shutdown)
        .await
        .map_err(|e| in_their_words(AppError::from(e), names).after_submission(job_id))
}
