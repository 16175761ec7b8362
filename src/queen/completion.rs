//! Submit and wait, for the APIs whose callers expect the images in the answer (OpenAI's, AUTOMATIC1111's).
//! The job is an ordinary one (queued, listed, cancellable, its events on the bus); the request only stays
//! open until it ends, or for `wait` at most, or until the queen shuts down: the caller then gets the job's
//! id to follow. A caller that goes away leaves the job to finish, as a `POST /v1/jobs` would.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::feed::feed;
use super::jobs::{Jobs, JobsError, JobsResult};
use crate::api::{ApiEvent, JobState};
use crate::protocol::{ErrorCode, ImageResult, ProtocolError};
use crate::storage::StoreError;

/// The most bytes of images one reply holds (its JSON takes a third more, in base64).
const MAX_REPLY_IMAGE_BYTES: u64 = 512 << 20;

/// A job that completed, with its images' bytes.
pub struct Finished {
    pub job_id: Uuid,
    pub images: Vec<(ImageResult, Bytes)>,
}

impl Jobs {
    /// Waits for the end of job `job_id`: its images, or why there are none (a failure the request caused is
    /// the request's error, 422; any other an internal one; a cancel, 409); or for `wait`, or until `shutdown`,
    /// whichever is first ([`JobsError::WaitTimeout`]).
    pub async fn finished(&self, job_id: Uuid, wait: Duration, shutdown: &CancellationToken) -> JobsResult<Finished> {
        let gave_up = |why: String| JobsError::WaitTimeout { id: job_id, why };
        tokio::select! {
            end = self.ended(job_id) => end,
            () = tokio::time::sleep(wait) => {
                Err(gave_up(format!("the queen waited {} (--compat-wait)", humantime::format_duration(wait))))
            }
            () = shutdown.cancelled() => Err(gave_up("the queen is shutting down".into())),
        }
    }

    async fn ended(&self, job_id: Uuid) -> JobsResult<Finished> {
        let status = self.get(job_id, &super::tenancy::Scope::All).await?;
        let mut events = feed(&self.bus, &self.status, &status, None, self.feed_recheck).await?;
        while let Some((_, event)) = events.next().await {
            match event {
                ApiEvent::Completed { images, .. } => {
                    let mut out = Vec::with_capacity(images.len());
                    // A reply holds its images: what one holds is bounded, whatever a worker stored.
                    let mut room = MAX_REPLY_IMAGE_BYTES;
                    for image in images {
                        let bytes = match self.store.get_at_most(&image.key, room).await {
                            Ok(bytes) => bytes,
                            // Swept since (its ttl passed as it completed): gone, as `GET …/images/{n}` says.
                            Err(e) if e.is_missing() => return Err(JobsError::NoImage(e.to_string())),
                            Err(e @ StoreError::TooLarge { .. }) => {
                                let why = format!("job {job_id}'s images are more than a reply holds: {e}");
                                return Err(JobsError::Internal(anyhow::anyhow!(why)));
                            }
                            Err(e) => return Err(e.into()),
                        };
                        room -= bytes.len() as u64;
                        out.push((image, bytes));
                    }
                    return Ok(Finished { job_id, images: out });
                }
                ApiEvent::Failed { code: ErrorCode::InvalidRequest, message, field, .. } => {
                    return Err(JobsError::Invalid(ProtocolError { code: ErrorCode::InvalidRequest, field, message }));
                }
                ApiEvent::Failed { code, message, .. } => {
                    return Err(JobsError::JobFailed { id: job_id, code, message });
                }
                ApiEvent::Cancelled { .. } => {
                    return Err(JobsError::AlreadyFinished { id: job_id, state: JobState::Cancelled })
                }
                _ => {}
            }
        }
        Err(JobsError::Unavailable(anyhow::anyhow!("the events of job {job_id} ended before the job did")))
    }
}
