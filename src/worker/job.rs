//! One delivery of one job, from the pulled message to its settlement: decode and validate, report an
//! earlier delivery's stored images, start (unless expired or cancelled early), generate and store
//! (`generate.rs`), then settle by the policy (`policy.rs`: what becomes of the message; `effects.rs`:
//! doing it). The same policy settles jobs JetStream stopped delivering ([`give_up_undeliverable`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, AckKind};
use tokio_util::task::AbortOnDropHandle;

use super::cache;
use super::control::StopReason;
use super::effects::{self, previous_result, publish_event, Target};
use super::generate::{generate_and_store, Failure};
use super::policy::{self, Delivery, Outcome, RetryPolicy, Settle};
use super::Shared;
use crate::protocol::{self, now_millis, Accepted, Event, JobRequest, ProtocolError, PROTOCOL_VERSION};

impl Delivery {
    fn of(msg: &jetstream::Message) -> Self {
        msg.info().map_or(Self { seq: 0, n: 1 }, |i| Self { seq: i.stream_sequence, n: i.delivered })
    }
}

/// Handles one delivered message of `model`'s consumer; never fails (every outcome is reported on the bus
/// and settles the message).
pub async fn handle(shared: Arc<Shared>, model: String, msg: jetstream::Message) {
    let delivered = Delivery::of(&msg);
    // In-progress acks, well inside ack_wait, for as long as the delivery is handled; at least every 5 s, so
    // a worker started with a shorter --ack-wait (whose consumer settings win) does not take the job over.
    // Each time, the stored cancels are read too: a cancel is also published once on core NATS, which a
    // worker whose connection was down or moving between servers then never hears.
    let _keepalive = {
        let (msg, shared) = (msg.clone(), shared.clone());
        let job_id = crate::bus::job_id_of(&msg.payload, msg.headers.as_ref());
        let every = (shared.config.consumer.ack_wait / 3).min(Duration::from_secs(5));
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut heeded = false;
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "in-progress ack failed");
                }
                let Some(job_id) = job_id.filter(|_| !heeded) else { continue };
                // No longer than the pause: the next in-progress ack is not held up.
                if let Some(request) = stored_cancel_quietly(&shared, job_id, every).await {
                    let reason = if request.expired { StopReason::Timeout } else { StopReason::Cancelled };
                    heeded = true;
                    if shared.control.cancel(job_id, reason) {
                        tracing::info!(%job_id, "a stored cancel request stops the job");
                    }
                }
            }
        }))
    };
    let job = match decode(&shared, &model, &msg.payload) {
        Ok(job) => job,
        Err(error) => {
            let job_id = crate::bus::job_id_of(&msg.payload, msg.headers.as_ref());
            let outcome = Outcome::Invalid { job_id, error };
            settle(&shared, &model, Target::Delivered(&msg), outcome, delivered).await;
            return;
        }
    };
    use tracing::Instrument;
    let span = tracing::info_span!("job", job_id = %job.id, model = %model, delivery = delivered.n);
    run(shared, model, msg, job, delivered).instrument(span).await;
}

/// The cancel request stored for the job (`SD_CANCELS`), if any: one this worker never heard, sent while
/// another worker held the job, or before this one started. Bounded: with NATS slow to answer, the job
/// runs, and a cancel sent since still reaches it.
async fn stored_cancel(shared: &Shared, job_id: uuid::Uuid) -> Option<protocol::CancelRequest> {
    let lookup = crate::bus::stored_cancel(&shared.js, &shared.subjects, job_id);
    match tokio::time::timeout(Duration::from_secs(3), lookup).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(%job_id, error = %format!("{e:#}"), "cannot look for a stored cancel; starting the job");
            None
        }
        Err(_) => {
            tracing::warn!(%job_id, "NATS is slow to say whether the job was cancelled; starting it");
            None
        }
    }
}

/// The cancel request stored for the job, as far as NATS says within `patience` (the keepalive's look: a
/// failure is left for the next one).
async fn stored_cancel_quietly(
    shared: &Shared,
    job_id: uuid::Uuid,
    patience: Duration,
) -> Option<protocol::CancelRequest> {
    let lookup = crate::bus::stored_cancel(&shared.js, &shared.subjects, job_id);
    tokio::time::timeout(patience, lookup).await.ok()?.ok()?
}

fn decode(shared: &Shared, model: &str, payload: &[u8]) -> Result<JobRequest, ProtocolError> {
    let job = protocol::decode_job(payload)?;
    job.validate(&shared.config.limits)?;
    if job.model != model {
        return Err(ProtocolError::invalid(
            "model",
            format!("is {:?} but the job was published on the subject of model {model:?}", job.model),
        ));
    }
    Ok(job)
}

async fn run(shared: Arc<Shared>, model: String, msg: jetstream::Message, job: JobRequest, delivered: Delivery) {
    let received_at = now_millis();
    let job_id = job.id;
    let target = Target::Delivered(&msg);
    // A redelivered job whose images are already stored: report them again, do not regenerate. The check
    // is bounded: with the store unreachable, generating (the same images: the seed is fixed) beats waiting.
    match tokio::time::timeout(Duration::from_secs(3), previous_result(&shared, job_id)).await {
        Ok(Ok(Some(mut completed))) => {
            completed.at = now_millis();
            for image in &mut completed.images {
                image.url = shared.store.presigned_get(&image.key, job.expires_at).await;
            }
            let outcome = Outcome::Completed { completed, fresh: false };
            settle(&shared, &model, target, outcome, delivered).await;
            return;
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::warn!(%job_id, error = %e, "cannot look for earlier results; generating"),
        Err(_) => tracing::warn!(%job_id, "the store is slow to answer; generating without checking earlier results"),
    }
    if job.is_expired(received_at) {
        settle(&shared, &model, target, Outcome::Expired { job_id }, delivered).await;
        return;
    }
    // Checked before it starts: a cancel published from now on reaches this worker's subscription (`control`).
    let stop = match stored_cancel(&shared, job_id).await {
        Some(request) if request.expired => Err(StopReason::Timeout),
        Some(_) => Err(StopReason::Cancelled),
        None => shared.control.start(job_id),
    };
    let stop = match stop {
        Ok(stop) => stop,
        Err(reason) => {
            // The sweeper's cancel (its ttl passed, by the queen's clock) ends it as expired, not cancelled.
            let outcome = match reason {
                StopReason::Timeout => Outcome::Expired { job_id },
                _ => Outcome::Cancelled { job_id, at_step: None },
            };
            settle(&shared, &model, target, outcome, delivered).await;
            return;
        }
    };
    // Handed back as it arrives (the worker is stopping): no `accepted`, no inputs read.
    if let Some(StopReason::Shutdown) = stop.reason() {
        let outcome = Failure::Stopped { reason: StopReason::Shutdown, at_step: None }.into_outcome(&job);
        settle(&shared, &model, target, outcome, delivered).await;
        shared.control.finish(job_id, &stop);
        return;
    }
    let accepted = Event::Accepted(Accepted {
        v: PROTOCOL_VERSION,
        job_id,
        at: now_millis(),
        worker_id: shared.worker_id.clone(),
        model: model.clone(),
        tenant: job.tenant.clone(),
    });
    publish_event(&shared, &accepted, delivered).await;

    // A seeded job an earlier one already made is answered with copies of its images.
    let inputs = super::generate::gather_inputs(&shared, &model, &job).await;
    let cache_key = match &inputs {
        Ok(inputs @ super::generate::JobInputs { loras: Ok(loras), .. }) => {
            cache::key(&shared, &model, &job, inputs, loras).await
        }
        _ => None,
    };
    // Reading the inputs and hashing the model's files for the key may take long: a cancel, the deadline or
    // the end of a shutdown's grace meanwhile is heeded before anything is stored.
    if let Some(reason) = stop.reason() {
        let outcome = Failure::Stopped { reason, at_step: None }.into_outcome(&job);
        settle(&shared, &model, target, outcome, delivered).await;
        shared.control.finish(job_id, &stop);
        return;
    }
    if let Some(key) = &cache_key {
        if let Some(completed) = cache::answer(&shared, &key.key, &job, received_at).await {
            tracing::info!(key = key.key, "answered from the result cache");
            shared.control.cache_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            settle(&shared, &model, target, Outcome::Completed { completed, fresh: true }, delivered).await;
            shared.control.finish(job_id, &stop);
            return;
        }
    }
    let outcome = match generate_and_store(&shared, &model, &job, inputs, &stop, delivered, received_at).await {
        Ok(completed) => {
            if let Some(key) = &cache_key {
                cache::keep(&shared, key, &completed).await;
            }
            Outcome::Completed { completed, fresh: true }
        }
        Err(failure) => failure.into_outcome(&job),
    };
    settle(&shared, &model, target, outcome, delivered).await;
    // Busy until the outcome is reported and counted (heartbeats read both).
    shared.control.finish(job_id, &stop);
}

/// Logs the outcome, then settles the message by the policy. Returns whether it was dealt with.
async fn settle(shared: &Shared, model: &str, target: Target<'_>, outcome: Outcome, delivered: Delivery) -> bool {
    log(&outcome, delivered);
    let retry =
        RetryPolicy { max_deliver: shared.config.consumer.max_deliver, backoff: shared.config.retry_backoff.clone() };
    let plan = policy::plan(outcome, delivered, &retry, now_millis());
    // The job ends here, not handed back or requeued: its checkpoint has no further use.
    if let (Some(job_id), false, Settle::Ack | Settle::Term) = (plan.job_id, plan.requeue, plan.settle) {
        super::resume::discard(shared, job_id).await;
    }
    effects::carry_out(shared, model, target, plan, delivered).await
}

fn log(outcome: &Outcome, delivered: Delivery) {
    let seq = delivered.seq;
    match outcome {
        Outcome::Completed { fresh: true, .. } => {}
        Outcome::Completed { completed, fresh: false } => {
            tracing::info!(job_id = %completed.job_id, "already completed by an earlier delivery; republishing")
        }
        Outcome::Invalid { job_id, error } => tracing::warn!(?job_id, stream_seq = seq, %error, "job rejected"),
        Outcome::Expired { job_id } => tracing::warn!(%job_id, "the deadline passed before the job started"),
        Outcome::Cancelled { job_id, at_step } => tracing::info!(%job_id, ?at_step, "job cancelled"),
        Outcome::TimedOut { job_id, at_step, .. } => tracing::warn!(%job_id, ?at_step, "the job ran out of time"),
        Outcome::Shutdown { job_id, at_step } => {
            tracing::warn!(%job_id, ?at_step, "shutting down: handing the job to another worker")
        }
        Outcome::Transient { job_id, code, message } => {
            tracing::warn!(%job_id, delivery = delivered.n, "{code}: {message}")
        }
        Outcome::Undeliverable { job_id, deliveries } => {
            tracing::error!(?job_id, stream_seq = seq, deliveries, "never settled; giving up")
        }
    }
}

/// A message of the jobs stream read by its sequence.
struct StoredJob {
    subject: String,
    time: async_nats::datetime::DateTime,
    headers: Option<async_nats::HeaderMap>,
    payload: bytes::Bytes,
}

/// Message `seq` of `stream` without its headers, through JetStream's API directly (the client's own read
/// fails on headers it cannot parse); `None` if there is none.
async fn stored_without_headers(js: &jetstream::Context, stream: &str, seq: u64) -> anyhow::Result<Option<StoredJob>> {
    use anyhow::Context as _;
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Answer {
        message: Option<Stored>,
        error: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct Stored {
        subject: String,
        #[serde(default)]
        data: String,
        time: String,
    }
    let answer: Answer = js
        .request(format!("STREAM.MSG.GET.{stream}"), &serde_json::json!({ "seq": seq }))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(stored) = answer.message else {
        let error = answer.error.unwrap_or_default();
        // 10037: no message found.
        return match error.get("err_code").and_then(|c| c.as_u64()) {
            Some(10037) => Ok(None),
            _ => Err(anyhow::anyhow!("JetStream answered {error}")),
        };
    };
    let payload = base64::engine::general_purpose::STANDARD.decode(&stored.data).context("the message's data")?;
    let time = async_nats::datetime::parse_rfc3339(&stored.time).map_err(|e| anyhow::anyhow!("its time: {e}"))?;
    Ok(Some(StoredJob { subject: stored.subject, time, headers: None, payload: payload.into() }))
}

/// How many tries of a max-deliveries advisory (5 s apart, each waiting up to 10 s for the store: 5 to 15
/// minutes) wait for a store that cannot say whether the job finished before it is failed anyway.
const STORE_PATIENCE_TRIES: i64 = 60;

/// A job JetStream stopped delivering after `max_deliver` deliveries that never settled (workers that
/// crashed or hung on it): report it `failed`, dead-letter it and remove it from the work queue, so it is
/// not silently stuck. Every worker of the model hears the advisory; the message ids make their reports one.
/// Returns false when it should be tried again later; `tries` counts this advisory's tries so far.
///
/// `advised_at` is the advisory's time: a message stored after it at that sequence (the stream was recreated,
/// its sequences counting again) is another job, and so is one on another model's subject.
pub async fn give_up_undeliverable(
    shared: &Shared,
    model: &str,
    (seq, advised_at): (u64, Option<async_nats::datetime::DateTime>),
    deliveries: i64,
    tries: i64,
) -> bool {
    let delivered = Delivery { seq, n: deliveries };
    let stream = match shared.js.get_stream(shared.subjects.jobs_stream()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot bind the jobs stream");
            return false;
        }
    };
    let raw = match stream.get_raw_message(seq).await {
        Ok(m) => {
            StoredJob { subject: m.subject.to_string(), time: m.time, headers: Some(m.headers), payload: m.payload }
        }
        // Already dealt with (by another worker, or an earlier try).
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return true,
        // The server could not say (restarting, electing a leader, overloaded), or its headers do not parse
        // (a publisher's bytes the client refuses: the reason its deliveries never settled); the job may still
        // sit in the queue with its deliveries spent, so this advisory is its only way out.
        Err(e) => match stored_without_headers(&shared.js, &shared.subjects.jobs_stream(), seq).await {
            Ok(Some(job)) => job,
            Ok(None) => return true,
            Err(again) => {
                tracing::warn!(stream_seq = seq, error = %e, again = %again, "cannot read an undeliverable job yet");
                return false;
            }
        },
    };
    if advised_at.is_some_and(|at| raw.time > at) || shared.subjects.model_of_jobs_subject(&raw.subject) != Some(model)
    {
        tracing::warn!(
            stream_seq = seq,
            subject = raw.subject,
            "a max-deliveries advisory names a message stored since, or another model's: left alone"
        );
        return true;
    }
    let job_id = crate::bus::job_id_of(&raw.payload, raw.headers.as_ref());
    let target = Target::Stored { stream: &stream, seq, payload: raw.payload };
    // The job may have finished after all, with only its report or ack lost: report it again. Failing it
    // is final, so a store that cannot say (down, or slow with its retries) is asked again for a while.
    if let Some(id) = job_id {
        match tokio::time::timeout(Duration::from_secs(10), previous_result(shared, id)).await {
            Ok(Ok(Some(mut completed))) => {
                completed.at = now_millis();
                let outcome = Outcome::Completed { completed, fresh: false };
                return settle(shared, model, target, outcome, delivered).await;
            }
            Ok(Ok(None)) => {}
            unknown if tries < STORE_PATIENCE_TRIES => {
                let why = unknown.map_or_else(|_| "timed out".to_string(), |r| format!("{:#}", r.unwrap_err()));
                tracing::warn!(job_id = %id, error = why, "cannot tell from the store whether an undeliverable job finished; asking again");
                return false;
            }
            _ => {
                tracing::error!(job_id = %id, "the store never said whether the undeliverable job finished: failing it")
            }
        }
    }
    settle(shared, model, target, Outcome::Undeliverable { job_id, deliveries }, delivered).await
}
