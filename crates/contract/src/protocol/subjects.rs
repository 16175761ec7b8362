//! NATS subjects and JetStream stream names ([`Subjects`]), and the checks of the subject tokens in them.

use uuid::Uuid;

use super::error::{quoted, ProtocolError};
use super::{DEFAULT_PREFIX, MAX_TOKEN_CHARS};
use crate::vocab::Priority;

/// Checks that `value` can be one NATS subject token: non-empty, at most [`MAX_TOKEN_CHARS`] characters,
/// no `.`, `*`, `>`, whitespace or control characters. `field` names it in the error.
pub fn validate_subject_token(field: &str, value: &str) -> Result<(), ProtocolError> {
    if value.is_empty() {
        return Err(ProtocolError::invalid(field, "must not be empty"));
    }
    if value.chars().count() > MAX_TOKEN_CHARS {
        return Err(ProtocolError::invalid(field, format!("must be at most {MAX_TOKEN_CHARS} characters")));
    }
    if let Some(c) = value.chars().find(|&c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()) {
        return Err(ProtocolError::invalid(
            field,
            format!(
                "{} contains {c:?}; a subject token has no '.', '*', '>', whitespace or control characters",
                quoted(value)
            ),
        ));
    }
    Ok(())
}

/// Checks a model name: a subject token that can also name a JetStream consumer (no `/` or `\\`).
pub fn validate_model_name(model: &str) -> Result<(), ProtocolError> {
    validate_subject_token("model", model)?;
    if let Some(c) = model.chars().find(|&c| matches!(c, '/' | '\\')) {
        return Err(ProtocolError::invalid(
            "model",
            format!("{} contains {c:?}; a model name has no '/' or '\\'", quoted(model)),
        ));
    }
    Ok(())
}

/// Checks a worker id (a subject token).
pub fn validate_worker_id(worker_id: &str) -> Result<(), ProtocolError> {
    validate_subject_token("worker_id", worker_id)
}

/// The subjects and stream names of one fleet, all under a prefix (default `sd`):
///
/// | what | subject | stream |
/// | --- | --- | --- |
/// | jobs | `sd.jobs.<model>` | `SD_JOBS` (work queue) |
/// | events | `sd.events.<job_id>` | `SD_EVENTS` (limits, max age) |
/// | dead letters | `sd.dlq.<model>` | `SD_DLQ` (limits, max age) |
/// | cancel requests | `sd.cancel.<job_id>` | none (core NATS) |
/// | heartbeats | `sd.workers.<worker_id>` | none (core NATS) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.to_string() }
    }
}

impl Subjects {
    /// Subjects under `prefix`: one or more dot-separated subject tokens, not starting with `$`
    /// (NATS' own subjects).
    pub fn new(prefix: impl Into<String>) -> Result<Self, ProtocolError> {
        let prefix = prefix.into();
        if prefix.starts_with('$') {
            return Err(ProtocolError::invalid("prefix", "must not start with '$' (reserved by NATS)"));
        }
        for token in prefix.split('.') {
            validate_subject_token("prefix", token)?;
        }
        Ok(Self { prefix })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `sd.jobs.<model>`: where jobs for `model` are published.
    pub fn jobs(&self, model: &str) -> Result<String, ProtocolError> {
        validate_model_name(model)?;
        Ok(format!("{}.jobs.{model}", self.prefix))
    }

    /// Where jobs for `model` wait at `priority`: `sd.jobs.<model>` (normal, as before priorities existed),
    /// `sd.jobs.<model>.high`, `sd.jobs.<model>.low`.
    pub fn jobs_at(&self, model: &str, priority: Priority) -> Result<String, ProtocolError> {
        let normal = self.jobs(model)?;
        Ok(match priority {
            Priority::Normal => normal,
            other => format!("{normal}.{}", other.as_str()),
        })
    }

    /// The model and priority of a jobs subject, `None` if it is not one.
    pub fn parse_jobs_subject<'a>(&self, subject: &'a str) -> Option<(&'a str, Priority)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".jobs.")?;
        let (model, priority) = match rest.split_once('.') {
            None => (rest, Priority::Normal),
            Some((model, "high")) => (model, Priority::High),
            Some((model, "low")) => (model, Priority::Low),
            Some(_) => return None,
        };
        validate_model_name(model).ok().map(|_| (model, priority))
    }

    /// `sd.jobs.>`: the jobs stream's subjects.
    pub fn jobs_wildcard(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }

    /// The model of a jobs subject, `None` if it is not one.
    pub fn model_of_jobs_subject<'a>(&self, subject: &'a str) -> Option<&'a str> {
        self.parse_jobs_subject(subject).map(|(model, _)| model)
    }

    /// `sd.events.<job_id>`: the job's events.
    pub fn events(&self, job_id: Uuid) -> String {
        format!("{}.events.{job_id}", self.prefix)
    }

    /// The job of an events subject, `None` if it is not one.
    pub fn job_of_events_subject(&self, subject: &str) -> Option<Uuid> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix(".events.")?;
        // Only the hyphenated form [`events`](Self::events) writes names the job (parse takes others too).
        Uuid::try_parse(rest).ok().filter(|id| id.hyphenated().to_string() == rest)
    }

    /// `sd.events.>`: the events stream's subjects.
    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// `sd.cancel.<job_id>`: cancel requests for the job.
    pub fn cancel(&self, job_id: Uuid) -> String {
        format!("{}.cancel.{job_id}", self.prefix)
    }

    /// `sd.cancel.>`: every cancel request.
    pub fn cancel_wildcard(&self) -> String {
        format!("{}.cancel.>", self.prefix)
    }

    /// `sd.workers.<worker_id>`: the worker's heartbeats.
    pub fn heartbeat(&self, worker_id: &str) -> Result<String, ProtocolError> {
        validate_worker_id(worker_id)?;
        Ok(format!("{}.workers.{worker_id}", self.prefix))
    }

    /// `sd.workers.>`: every worker's heartbeats.
    pub fn heartbeats_wildcard(&self) -> String {
        format!("{}.workers.>", self.prefix)
    }

    /// `sd.dlq.<model>`: jobs for `model` that were given up on.
    pub fn dead_letter(&self, model: &str) -> Result<String, ProtocolError> {
        validate_model_name(model)?;
        Ok(format!("{}.dlq.{model}", self.prefix))
    }

    /// `sd.dlq.>`: the dead-letter stream's subjects.
    pub fn dead_letter_wildcard(&self) -> String {
        format!("{}.dlq.>", self.prefix)
    }

    fn stream_name(&self, suffix: &str) -> String {
        let base: String =
            self.prefix.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        format!("{base}_{suffix}")
    }

    /// `SD_JOBS`: the work-queue stream of jobs.
    pub fn jobs_stream(&self) -> String {
        self.stream_name("JOBS")
    }

    /// `SD_EVENTS`: the events stream.
    pub fn events_stream(&self) -> String {
        self.stream_name("EVENTS")
    }

    /// `SD_CANCELS`: the cancel requests (`sd.cancel.>`), kept so a worker that takes a job later, one that
    /// never heard the request, still finds it.
    pub fn cancels_stream(&self) -> String {
        self.stream_name("CANCELS")
    }

    /// `SD_ADVISORIES`: JetStream's max-deliveries advisories for the jobs stream.
    pub fn advisories_stream(&self) -> String {
        self.stream_name("ADVISORIES")
    }

    /// `SD_STATUS`: the queens' KV bucket of job status.
    pub fn status_bucket(&self) -> String {
        self.stream_name("STATUS")
    }

    /// `sd.index`: the queens' index of jobs (one message per job: its id).
    pub fn index(&self) -> String {
        format!("{}.index", self.prefix)
    }

    /// `SD_INDEX`: the stream of the job index, in the order jobs were first heard of.
    pub fn index_stream(&self) -> String {
        self.stream_name("INDEX")
    }

    /// `sd.expiry`: when each job with a ttl expires (one message per job), for the queens' sweeper.
    pub fn expiry(&self) -> String {
        format!("{}.expiry", self.prefix)
    }

    /// `SD_EXPIRY`: the work queue of expiries; a message is acknowledged once its job is swept.
    pub fn expiry_stream(&self) -> String {
        self.stream_name("EXPIRY")
    }

    /// `sd.webhooks`: webhook deliveries waiting to be sent (one message per event), for the queens' sender.
    pub fn webhooks(&self) -> String {
        format!("{}.webhooks", self.prefix)
    }

    /// `SD_WEBHOOKS`: the work queue of webhook deliveries; a message is acknowledged once its receiver took
    /// it or it was given up on.
    pub fn webhooks_stream(&self) -> String {
        self.stream_name("WEBHOOKS")
    }

    /// `SD_DLQ`: the dead-letter stream.
    pub fn dlq_stream(&self) -> String {
        self.stream_name("DLQ")
    }
}
