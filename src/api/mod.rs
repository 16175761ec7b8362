//! The queen's HTTP contract, shared by the server (`queen::http`) and its clients (the CLI, the tests):
//! every body that crosses the API, one table of error codes, the typed events of a job, and
//! [`QueenClient`]. Nothing here serves or stores anything; the conversions to and from the bus's
//! [`JobRequest`](crate::protocol::JobRequest) are the one place where the two meet.
//!
//! # Layout
//!
//! - `submission`: [`JobSubmission`] (`POST /v1/jobs`) with its conversions, [`SubmitResponse`],
//!   [`UploadResponse`];
//! - `views`: [`JobStatus`] and [`StatusView`], [`JobList`], [`CancelResponse`], [`LimitsView`], [`ModelInfo`],
//!   [`WorkerInfo`];
//! - `events`: [`ApiEvent`], the one mapping from bus events and status records to Server-Sent Events, and
//!   [`EventId`] (`id:` / `Last-Event-ID`);
//! - `error`: [`ApiErrorCode`] with its HTTP status, the error body [`ApiErrorBody`], and [`ApiError`] as
//!   clients see it;
//! - `client`: [`QueenClient`].

mod client;
mod error;
mod events;
mod submission;
mod views;

pub use client::{QueenClient, SseMessage};
pub use error::{ApiError, ApiErrorBody, ApiErrorCode, ApiErrorDetail};
pub use events::{ApiEvent, EventId};
pub use submission::{ImageInput, JobSubmission, SubmitResponse, UploadResponse};
pub use views::{
    CancelResponse, CancelState, ErrorInfo, JobList, JobState, JobStatus, LimitsView, ModelInfo, ProgressInfo,
    RequestSummary, StatusView, WorkerInfo,
};
