//! The queen's HTTP contract, shared by the server (`sd_rbee::queen::http`), its clients (the CLI's
//! `QueenClient`, the tests) and the WebAssembly SDK: every body that crosses the API, one table of error
//! codes, the typed events of a job, and the rules of a job's status record. Nothing here serves or stores
//! anything; the conversions to and from the bus's [`JobRequest`](crate::protocol::JobRequest) are the one
//! place where the two meet.
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
//! - `status`: how a [`JobStatus`] is made and moved along by events;
//! - `check`: the checks of a submission that need only the queen's limits ([`check_submission`]);
//! - `webhook`: a job's [`WebhookSpec`], what its status shows of the deliveries ([`WebhookInfo`]), their
//!   body ([`WebhookBody`]) and signatures ([`WebhookSecret`]);
//! - `openai`, `a1111`: the other APIs the queen speaks (OpenAI's images, AUTOMATIC1111's `/sdapi/v1`), as
//!   their requests map to a [`JobSubmission`] and their answers are shaped.

pub mod a1111;
mod check;
mod error;
mod events;
pub mod openai;
mod status;
mod submission;
mod views;
mod webhook;

pub use check::{check_job, check_submission, parse_json_body, JobCheckError};
pub use error::{in_their_words, ApiError, ApiErrorBody, ApiErrorCode, ApiErrorDetail};
pub use events::{ApiEvent, EventId};
pub use submission::{
    decode_base64, ImageInput, JobSubmission, SubmitResponse, UploadResponse, MAX_DECODED_IMAGE_BYTES,
    SUBMISSION_FIELD_NAMES,
};
pub use views::{
    CancelResponse, CancelState, ErrorInfo, JobList, JobState, JobStatus, LimitsView, ModelInfo, ProgressInfo,
    RequestSummary, StatusView, TokenInfo, WorkerInfo,
};
pub use webhook::{
    WebhookBody, WebhookDeadLetter, WebhookEvent, WebhookInfo, WebhookSecret, WebhookSpec, MAX_DEAD_LETTERS,
    MAX_WEBHOOK_URL_BYTES, MIN_SECRET_BYTES, WEBHOOK_ID_HEADER, WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER,
};
