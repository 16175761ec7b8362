//! One delivery of one job, from the pulled message to its ack: decode and validate, generate with
//! progress events and in-progress acks, upload, publish the terminal event, then ack, term or nak.
//!
//! The outcome decides what happens to the message:
//!
//! | outcome | event | message |
//! | --- | --- | --- |
//! | images stored | `completed` | ack |
//! | already stored by an earlier delivery | `completed` again | ack |
//! | undecodable or invalid job | `failed` `INVALID_REQUEST` | dead-lettered, term |
//! | cancel request | `cancelled` | term |
//! | deadline or worker timeout | `failed` `TIMEOUT` | term |
//! | transient (storage down, device error) | none | nak with backoff; on the last delivery `failed` + dead-letter |
//! | shutdown grace over | none | nak now: another worker takes it |

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use uuid::Uuid;

use super::control::StopReason;
use super::dead_letter::{dead_letter, dead_letter_payload, DeadLetterError};
use super::Shared;
use crate::diffusion::{GenerateError, SchedulerKind, StepInfo, TimestepSpacing};
use crate::generation::{self, LoadedModel, Params};
use crate::protocol::{
    self, now_millis, Accepted, Cancelled, Completed, ErrorCode, Event, Failed, ImageResult, ImageSource, JobRequest,
    Progress, ProtocolError, Timings, PROTOCOL_VERSION,
};

/// Where a finished job's `completed` event is kept, beside its images: its presence means every image of
/// the job is stored.
pub fn manifest_key(job_id: Uuid) -> String {
    format!("{}completed.msgpack", protocol::result_prefix(job_id))
}

/// Why a delivery did not complete.
enum Failure {
    /// The job can never succeed: report, dead-letter, term.
    Invalid(ProtocolError),
    /// Stopped on purpose.
    Stopped { reason: StopReason, at_step: Option<u32> },
    /// May succeed later or elsewhere: nak with backoff (dead-letter on the last delivery).
    Transient { code: ErrorCode, message: String },
}

impl Failure {
    fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Failure::Invalid(ProtocolError::invalid(field, message))
    }
    fn transient(code: ErrorCode, message: impl std::fmt::Display) -> Self {
        Failure::Transient { code, message: message.to_string() }
    }
}

/// One progress update from the generation thread.
struct Step {
    step: u32,
    total: u32,
    elapsed: Duration,
    preview: Option<Vec<u8>>,
}

/// Which delivery of which job message is handled. A job queued again (see [`requeue`]) is a new message
/// whose deliveries count from 1 again; the stream sequence keeps its events apart from the first message's.
#[derive(Clone, Copy, Debug)]
pub(super) struct Delivery {
    /// The message's sequence in the jobs stream.
    pub seq: u64,
    /// Its delivery count, from 1.
    pub n: i64,
}

impl Delivery {
    fn of(msg: &jetstream::Message) -> Self {
        msg.info().map_or(Self { seq: 0, n: 1 }, |i| Self { seq: i.stream_sequence, n: i.delivered })
    }
}

/// Handles one delivered message of `model`'s consumer; never fails (every outcome is reported on the bus
/// and settles the message).
pub async fn handle(shared: Arc<Shared>, model: String, msg: jetstream::Message) {
    let delivered = Delivery::of(&msg);
    // In-progress acks, well inside ack_wait, for as long as the delivery is handled.
    let keepalive = {
        let msg = msg.clone();
        let every = shared.config.consumer.ack_wait / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "in-progress ack failed");
                }
            }
        })
    };
    let _keepalive = AbortOnDrop(keepalive);

    let job = match decode(&shared, &model, &msg.payload) {
        Ok(job) => job,
        Err(err) => {
            let job_id = crate::bus::job_id_of(&msg.payload, msg.headers.as_ref());
            tracing::warn!(?job_id, stream_seq = delivered.seq, error = %err, "invalid job message");
            // The dead letter first: whoever sees `failed` finds the copy.
            if let Err(DeadLetterError::Unavailable) =
                dead_letter(&shared, &model, &msg, job_id, &err.to_string(), delivered).await
            {
                return settle(&msg, retry_later()).await;
            }
            if let Some(job_id) = job_id {
                publish_event(&shared, &Event::Failed(Failed::from_error(job_id, &err, now_millis())), delivered).await;
            }
            shared.control.jobs_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            settle(&msg, AckKind::Term).await;
            return;
        }
    };
    use tracing::Instrument;
    let span = tracing::info_span!("job", job_id = %job.id, model = %model, delivery = delivered.n);
    run(shared, model, msg, job, delivered).instrument(span).await;
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
    // A redelivered job whose images are already stored: report them again, do not regenerate. The check
    // is bounded: with the store unreachable, generating (the same images: the seed is fixed) beats waiting.
    match tokio::time::timeout(Duration::from_secs(3), previous_result(&shared, job_id)).await {
        Ok(Ok(Some(mut completed))) => {
            tracing::info!(%job_id, "already completed by an earlier delivery; republishing");
            completed.at = now_millis();
            for image in &mut completed.images {
                image.url = shared.store.presigned_get(&image.key).await;
            }
            if publish_event(&shared, &Event::Completed(completed), delivered).await {
                settle(&msg, AckKind::Ack).await;
            }
            return;
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::warn!(%job_id, error = %e, "cannot look for earlier results; generating"),
        Err(_) => tracing::warn!(%job_id, "the store is slow to answer; generating without checking earlier results"),
    }
    if job.is_expired(received_at) {
        let failed = failed(job_id, ErrorCode::Timeout, "the job's deadline passed before a worker took it", None);
        publish_event(&shared, &failed, delivered).await;
        shared.control.jobs_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        settle(&msg, AckKind::Term).await;
        return;
    }
    let Some(stop) = shared.control.start(job_id) else {
        let cancelled = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id, at: now_millis(), at_step: None });
        publish_event(&shared, &cancelled, delivered).await;
        settle(&msg, AckKind::Term).await;
        return;
    };
    let accepted = Event::Accepted(Accepted {
        v: PROTOCOL_VERSION,
        job_id,
        at: now_millis(),
        worker_id: shared.worker_id.clone(),
    });
    publish_event(&shared, &accepted, delivered).await;

    let outcome = generate_and_store(&shared, &model, &job, &stop, delivered, received_at).await;
    settle_outcome(&shared, &model, &msg, &job, delivered, outcome).await;
    // Busy until the outcome is reported and counted (heartbeats read both).
    shared.control.finish(job_id);
}

async fn settle_outcome(
    shared: &Arc<Shared>,
    model: &str,
    msg: &jetstream::Message,
    job: &JobRequest,
    delivered: Delivery,
    outcome: Result<Completed, Failure>,
) {
    let job_id = job.id;
    match outcome {
        Ok(completed) => {
            if publish_event(shared, &Event::Completed(completed), delivered).await {
                shared.control.jobs_done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                settle(msg, AckKind::Ack).await;
            }
            // Else the images are stored but nobody was told: the redelivery republishes.
        }
        Err(Failure::Invalid(err)) => {
            tracing::warn!(%job_id, error = %err, "job rejected");
            if let Err(DeadLetterError::Unavailable) =
                dead_letter(shared, model, msg, Some(job_id), &err.to_string(), delivered).await
            {
                return settle(msg, retry_later()).await;
            }
            publish_event(shared, &Event::Failed(Failed::from_error(job_id, &err, now_millis())), delivered).await;
            shared.control.jobs_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            settle(msg, AckKind::Term).await;
        }
        Err(Failure::Stopped { reason: StopReason::Cancelled, at_step }) => {
            tracing::info!(%job_id, ?at_step, "job cancelled");
            let event = Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id, at: now_millis(), at_step });
            publish_event(shared, &event, delivered).await;
            settle(msg, AckKind::Term).await;
        }
        Err(Failure::Stopped { reason: StopReason::Timeout, at_step }) => {
            let message = format!(
                "the job ran past its {} after {} steps",
                if job.deadline.is_some() { "deadline" } else { "time limit" },
                at_step.unwrap_or(0)
            );
            tracing::warn!(%job_id, "{message}");
            publish_event(shared, &failed(job_id, ErrorCode::Timeout, &message, None), delivered).await;
            shared.control.jobs_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            settle(msg, AckKind::Term).await;
        }
        Err(Failure::Stopped { reason: StopReason::Shutdown, at_step }) => {
            let max = shared.config.consumer.max_deliver;
            if max > 0 && delivered.n >= max {
                // A nak would leave the job no delivery, and JetStream would give it up though nothing failed.
                match requeue(shared, msg, job_id, delivered).await {
                    Ok(seq) => {
                        tracing::warn!(%job_id, ?at_step, seq, "shutting down on the job's last delivery: queued again");
                        settle(msg, AckKind::Term).await;
                    }
                    Err(e) => {
                        tracing::error!(%job_id, error = %e, "cannot queue the job again; handing it back");
                        settle(msg, AckKind::Nak(None)).await;
                    }
                }
            } else {
                tracing::warn!(%job_id, ?at_step, "shutting down: handing the job to another worker");
                settle(msg, AckKind::Nak(None)).await;
            }
        }
        Err(Failure::Transient { code, message }) => {
            transient(shared, model, msg, job, delivered, code, &message).await;
        }
    }
}

/// A failure that may pass: nak with the configured backoff, or give up on the last delivery.
async fn transient(
    shared: &Shared,
    model: &str,
    msg: &jetstream::Message,
    job: &JobRequest,
    delivered: Delivery,
    code: ErrorCode,
    message: &str,
) {
    let max = shared.config.consumer.max_deliver;
    if max > 0 && delivered.n >= max {
        let reason = format!("gave up after {} deliveries: {message}", delivered.n);
        tracing::error!(job_id = %job.id, "{reason}");
        if let Err(DeadLetterError::Unavailable) =
            dead_letter(shared, model, msg, Some(job.id), &reason, delivered).await
        {
            return settle(msg, retry_later()).await;
        }
        publish_event(shared, &failed(job.id, code, &reason, None), delivered).await;
        shared.control.jobs_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        settle(msg, AckKind::Term).await;
    } else {
        let backoff = &shared.config.retry_backoff;
        let delay = backoff.get((delivered.n.max(1) - 1) as usize).or(backoff.last()).copied();
        tracing::warn!(job_id = %job.id, ?delay, "{code}: {message}; will retry");
        settle(msg, AckKind::Nak(delay)).await;
    }
}

fn failed(job_id: Uuid, code: ErrorCode, message: &str, field: Option<String>) -> Event {
    let message = protocol::truncate(message, protocol::MAX_ERROR_MESSAGE_BYTES).to_string();
    Event::Failed(Failed { v: PROTOCOL_VERSION, job_id, at: now_millis(), code, message, field })
}

async fn previous_result(shared: &Shared, job_id: Uuid) -> anyhow::Result<Option<Completed>> {
    let key = manifest_key(job_id);
    match shared.store.get(&key).await {
        Ok(bytes) => match protocol::decode_event(&bytes) {
            Ok(Event::Completed(c)) if c.job_id == job_id => Ok(Some(c)),
            _ => {
                tracing::warn!(key, "unreadable result manifest; regenerating");
                Ok(None)
            }
        },
        Err(crate::storage::StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A picture of the job: inline bytes, or an object in the store.
async fn load_picture(shared: &Shared, source: &ImageSource, field: &str) -> Result<image::DynamicImage, Failure> {
    let bytes: Bytes = match source {
        ImageSource::Inline(b) => Bytes::copy_from_slice(b),
        ImageSource::ObjectKey(key) => {
            use crate::storage::StoreError;
            match shared.store.get_at_most(key, crate::image_input::MAX_ENCODED_BYTES as u64).await {
                Ok(b) => b,
                Err(
                    e @ (StoreError::NotFound { .. } | StoreError::InvalidKey { .. } | StoreError::TooLarge { .. }),
                ) => return Err(Failure::invalid(field, e)),
                Err(e) => return Err(Failure::transient(ErrorCode::Storage, e)),
            }
        }
    };
    crate::image_input::decode_bounded(bytes, field).await.map_err(|e| match e.is::<crate::image_input::DecodeBusy>() {
        true => Failure::transient(ErrorCode::Internal, e),
        false => Failure::invalid(field, format!("{e:#}")),
    })
}

/// The seed of a job that names none: derived from its id, so a redelivered job makes the same images.
pub fn seed_for(job: &JobRequest) -> u64 {
    job.seed.unwrap_or_else(|| {
        let b = job.id.as_bytes();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64
    })
}

fn params_of(job: &JobRequest) -> Result<Params, Failure> {
    let mut p = Params::new(job.prompt.clone());
    p.negative_prompt = job.negative_prompt.clone();
    p.width = Some(job.width as usize);
    p.height = Some(job.height as usize);
    p.steps = job.steps.map(|s| s as usize);
    p.guidance = job.guidance;
    p.scheduler = job
        .scheduler
        .as_deref()
        .map(str::parse::<SchedulerKind>)
        .transpose()
        .map_err(|e| Failure::invalid("scheduler", e))?;
    p.timestep_spacing = job
        .timestep_spacing
        .as_deref()
        .map(str::parse::<TimestepSpacing>)
        .transpose()
        .map_err(|e| Failure::invalid("timestep_spacing", e))?;
    p.seed = Some(seed_for(job));
    p.num_images = job.num_images as usize;
    p.strength = job.strength_or_default();
    p.mask_blur = job.mask_blur as f32;
    p.invert_mask = job.invert_mask;
    p.paste_back = Some(job.paste_back);
    p.resize = job.resize_mode;
    p.clip_skip = job.clip_skip.map(|s| s as usize);
    Ok(p)
}

/// An encoded result image.
struct Encoded {
    bytes: Vec<u8>,
    seed: u64,
    width: u32,
    height: u32,
}

async fn generate_and_store(
    shared: &Arc<Shared>,
    model: &str,
    job: &JobRequest,
    stop: &super::control::StopHandle,
    delivered: Delivery,
    received_at: u64,
) -> Result<Completed, Failure> {
    if !shared.catalogue.contains(model) {
        return Err(Failure::invalid("model", format!("{model:?} is not served by worker {}", shared.worker_id)));
    }
    let mut params = params_of(job)?;
    if let Some(src) = &job.init_image {
        params.init_image = Some(load_picture(shared, src, "init_image").await?);
    }
    if let Some(src) = &job.mask {
        params.mask = Some(load_picture(shared, src, "mask").await?);
    }
    if job.kind == protocol::JobKind::Txt2Img {
        params.strength = None;
    }
    if !job.loras.is_empty() {
        let wanted: Vec<(String, f64)> = job.loras.iter().map(|l| (l.name.clone(), l.scale)).collect();
        params.loras = shared.loras.resolve(&wanted).await.map_err(|e| match e {
            crate::loras::LoraSourceError::Unavailable(m) => Failure::transient(ErrorCode::Storage, m),
            e => Failure::invalid("loras", e),
        })?;
    }
    // The job is checked and its inputs read before its model is loaded: an invalid job evicts nothing.
    if !shared.catalogue.is_resident(model) {
        let mut loading = Progress::new(job.id, 0, job.steps.unwrap_or(0), now_millis());
        loading.phase = Some(protocol::JobPhase::Loading);
        publish_event(shared, &Event::Progress(loading), delivered).await;
    }
    let checkout = shared
        .catalogue
        .checkout(model)
        .await
        .map_err(|e| Failure::transient(ErrorCode::Internal, format!("cannot load the model: {e:#}")))?;
    let loaded: Arc<LoadedModel> = checkout.model;
    let load_ms = checkout.load_ms.unwrap_or(0.0) as u64;

    // Generation runs on a blocking thread; progress comes back through a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Step>();
    let flag = stop.flag().clone();
    let preview_every = shared.config.preview_every;
    let step_delay = shared.config.step_delay;
    let format = job.output.format;
    let quality = job.output.quality.unwrap_or(generation::DEFAULT_QUALITY);
    let gen_loaded = loaded.clone();
    let started = Instant::now();
    let generation = tokio::task::spawn_blocking(move || -> Result<(Vec<Encoded>, f64), GenerateError> {
        let sd = &gen_loaded.pipeline;
        let prepared = generation::prepare(sd, gen_loaded.entry, params)?;
        for w in &prepared.warnings {
            tracing::warn!("{w}");
        }
        let mut on_step = |info: &StepInfo| {
            if !step_delay.is_zero() {
                std::thread::sleep(step_delay);
            }
            let preview = (preview_every > 0 && (info.step as u32 % preview_every == 0 || info.step == info.total))
                .then(|| {
                    info.preview(0)
                        .ok()
                        .and_then(|p| generation::encode_image(&p, protocol::ImageFormat::Jpeg, 70).ok())
                })
                .flatten();
            let _ = tx.send(Step { step: info.step as u32, total: info.total as u32, elapsed: info.elapsed, preview });
        };
        let output = sd.generate(&prepared.request, &mut on_step, Some(&flag))?;
        for w in &output.warnings {
            tracing::warn!("{w}");
        }
        let finals = prepared.finish(&output)?;
        let encoded = finals
            .iter()
            .zip(&output.images)
            .map(|(pixels, img)| {
                let (_, h, w) = pixels.dims3()?;
                let bytes = generation::encode_tensor(pixels, format, quality)?;
                Ok(Encoded { bytes, seed: img.seed, width: w as u32, height: h as u32 })
            })
            .collect::<Result<_, GenerateError>>()?;
        Ok((encoded, output.timings.lora_ms))
    });

    // Forward progress while it runs; stop it at the deadline or the worker's time limit.
    let limit = {
        let own = shared.config.job_timeout;
        let to_deadline = job.deadline.map(|d| Duration::from_millis(d.saturating_sub(now_millis())));
        to_deadline.map_or(own, |d| d.min(own))
    };
    let timer = tokio::time::sleep(limit);
    tokio::pin!(timer);
    tokio::pin!(generation);
    let mut last_step = None;
    let result = loop {
        tokio::select! {
            biased;
            Some(step) = rx.recv() => {
                last_step = Some(step.step);
                publish_progress(shared, job.id, &step, delivered).await;
            }
            res = &mut generation => break res,
            _ = &mut timer, if stop.reason().is_none() => {
                stop.stop(StopReason::Timeout);
            }
        }
    };
    while let Ok(step) = rx.try_recv() {
        last_step = Some(step.step);
        publish_progress(shared, job.id, &step, delivered).await;
    }
    let generation_ms = started.elapsed().as_millis() as u64;
    let (encoded, lora_ms) = match result {
        Ok(Ok(done)) => done,
        Ok(Err(GenerateError::Cancelled { completed, .. })) => {
            let reason = stop.reason().unwrap_or(StopReason::Cancelled);
            return Err(Failure::Stopped { reason, at_step: Some(completed as u32) });
        }
        Ok(Err(GenerateError::InvalidRequest { field, message })) => return Err(Failure::invalid(field, message)),
        Ok(Err(e @ GenerateError::NonFinite { .. })) => {
            return Err(Failure::transient(ErrorCode::Internal, e));
        }
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            let code = if text.to_ascii_lowercase().contains("out of memory") {
                ErrorCode::OutOfMemory
            } else {
                ErrorCode::Internal
            };
            return Err(Failure::Transient { code, message: text });
        }
        Err(join) => return Err(Failure::transient(ErrorCode::Internal, format!("generation thread failed: {join}"))),
    };
    let step_ms = last_step.filter(|&n| n > 0).map(|n| generation_ms as f64 / f64::from(n));

    // Upload every image, then the manifest that marks the job done.
    let upload_started = Instant::now();
    let ext = format.extension();
    let mut images = Vec::with_capacity(encoded.len());
    for (i, img) in encoded.into_iter().enumerate() {
        let key = protocol::result_key(job.id, i as u32, ext);
        let size = img.bytes.len() as u64;
        shared
            .store
            .put(&key, Bytes::from(img.bytes), format.content_type())
            .await
            .map_err(|e| Failure::transient(ErrorCode::Storage, e))?;
        let url = shared.store.presigned_get(&key).await;
        images.push(ImageResult {
            index: i as u32,
            key,
            url,
            width: img.width,
            height: img.height,
            seed: img.seed,
            bytes: size,
            content_type: format.content_type().to_string(),
        });
    }
    let upload_ms = upload_started.elapsed().as_millis() as u64;
    let at = now_millis();
    let completed = Completed {
        v: PROTOCOL_VERSION,
        job_id: job.id,
        at,
        images,
        timings: Timings {
            queue_ms: received_at.saturating_sub(job.created_at),
            lora_ms: lora_ms as u64,
            load_ms,
            generation_ms,
            upload_ms,
            total_ms: at.saturating_sub(job.created_at),
        },
    };
    let manifest = protocol::encode(&Event::Completed(completed.clone()));
    shared
        .store
        .put(&manifest_key(job.id), Bytes::from(manifest), "application/msgpack")
        .await
        .map_err(|e| Failure::transient(ErrorCode::Storage, e))?;
    tracing::info!(job_id = %job.id, generation_ms, upload_ms, generation_ms_per_step = step_ms.unwrap_or(0.0), "job completed");
    Ok(completed)
}

async fn publish_progress(shared: &Shared, job_id: Uuid, step: &Step, delivered: Delivery) {
    let mut progress = Progress::new(job_id, step.step, step.total, now_millis());
    if step.step > 0 {
        let per_step = step.elapsed / step.step;
        progress.eta_ms = Some((per_step * step.total.saturating_sub(step.step)).as_millis() as u64);
    }
    progress.preview_jpeg = step.preview.clone();
    publish_event(shared, &Event::Progress(progress), delivered).await;
}

/// Publishes an event on the job's subject (persisted in the events stream), retrying while the server is
/// away. Returns whether it was stored. The message id makes a retried publish a single event. An event too
/// big for the server is sent smaller (a progress event without its preview, a failure with a shorter
/// message), never retried as it is.
async fn publish_event(shared: &Shared, event: &Event, delivered: Delivery) -> bool {
    let job_id = event.job_id();
    let msg_id = match event {
        Event::Progress(p) if p.phase.is_some() => format!("{job_id}:{}.{}:loading", delivered.seq, delivered.n),
        Event::Progress(p) => format!("{job_id}:{}.{}:progress:{}", delivered.seq, delivered.n, p.step),
        other => format!("{job_id}:{}.{}:{}", delivered.seq, delivered.n, other.type_name()),
    };
    // Progress is worth little once late; the terminal events are worth waiting for.
    let patience =
        if matches!(event, Event::Progress(_)) { Duration::from_secs(2) } else { shared.config.publish_patience };
    let subject = shared.subjects.events(job_id);
    let mut event = std::borrow::Cow::Borrowed(event);
    loop {
        let headers = crate::bus::msg_id_headers(&msg_id);
        let payload = protocol::encode(event.as_ref()).into();
        match crate::bus::publish_persistent(&shared.js, subject.clone(), headers, payload, patience).await {
            Ok(_) => return true,
            Err(e @ crate::bus::PublishError::TooLarge { .. }) => match smaller_event(&event) {
                Some(smaller) => {
                    tracing::warn!(%job_id, event = event.type_name(), error = %e, "event too large; sending it smaller");
                    event = std::borrow::Cow::Owned(smaller);
                }
                None => {
                    tracing::error!(%job_id, event = event.type_name(), error = %e, "cannot publish event");
                    return false;
                }
            },
            Err(e) => {
                tracing::error!(%job_id, event = event.type_name(), error = %e, "cannot publish event");
                return false;
            }
        }
    }
}

/// The same event with less in it, when there is less to send: a progress event without its preview, a
/// failure with a short message. `None` when nothing more can go.
fn smaller_event(event: &Event) -> Option<Event> {
    const SHORT: usize = 200;
    match event {
        Event::Progress(p) if p.preview_jpeg.is_some() => {
            Some(Event::Progress(protocol::Progress { preview_jpeg: None, ..p.clone() }))
        }
        Event::Failed(f) if f.message.len() > SHORT || f.field.as_ref().is_some_and(|x| x.len() > SHORT) => {
            let mut f = f.clone();
            f.message = protocol::truncate(&f.message, SHORT).to_string();
            f.field = f.field.map(|x| protocol::truncate(&x, SHORT).to_string());
            Some(Event::Failed(f))
        }
        _ => None,
    }
}

/// Publishes the job's message again, bytes unchanged, as a new message of the work queue (at its end, with
/// fresh deliveries), for a job handed back on its last delivery. Returns the new message's sequence.
async fn requeue(shared: &Shared, msg: &jetstream::Message, job_id: Uuid, delivered: Delivery) -> anyhow::Result<u64> {
    let headers = crate::bus::msg_id_headers(&crate::bus::requeue_msg_id(job_id, delivered.seq));
    let subject = msg.subject.to_string();
    let ack = crate::bus::publish_persistent(
        &shared.js,
        subject,
        headers,
        msg.payload.clone(),
        shared.config.publish_patience,
    )
    .await?;
    Ok(ack.sequence)
}

/// A job JetStream stopped delivering after `max_deliver` deliveries that never settled (workers that
/// crashed or hung on it): report it `failed`, dead-letter it and remove it from the work queue, so it is
/// not silently stuck. Every worker of the model hears the advisory; the message ids make their reports one.
pub async fn give_up_undeliverable(shared: &Shared, model: &str, seq: u64, deliveries: i64) -> bool {
    let delivered = Delivery { seq, n: deliveries };
    let stream = match shared.js.get_stream(shared.subjects.jobs_stream()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot bind the jobs stream");
            return false;
        }
    };
    let raw = match stream.get_raw_message(seq).await {
        Ok(m) => m,
        // Already dealt with (by another worker, or an earlier try).
        Err(_) => return true,
    };
    let job_id = crate::bus::job_id_of(&raw.payload, Some(&raw.headers));
    // The job may have finished after all, with only its report or ack lost: report it again.
    if let Some(id) = job_id {
        if let Ok(Ok(Some(mut completed))) =
            tokio::time::timeout(Duration::from_secs(3), previous_result(shared, id)).await
        {
            completed.at = now_millis();
            if publish_event(shared, &Event::Completed(completed), delivered).await {
                let _ = stream.delete_message(seq).await;
                return true;
            }
            return false;
        }
    }
    let reason = format!(
        "delivered {deliveries} times without finishing (the workers running it crashed or stalled); giving up"
    );
    tracing::error!(?job_id, seq, "{reason}");
    if let Err(DeadLetterError::Unavailable) =
        dead_letter_payload(shared, model, raw.payload, job_id, &reason, delivered).await
    {
        return false;
    }
    if let Some(job_id) = job_id {
        publish_event(shared, &failed(job_id, ErrorCode::Internal, &reason, None), delivered).await;
    }
    shared.control.jobs_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = stream.delete_message(seq).await;
    true
}

/// When a job could not be dead-lettered (NATS away): leave it to a later delivery rather than lose it.
fn retry_later() -> AckKind {
    AckKind::Nak(Some(Duration::from_secs(5)))
}

async fn settle(msg: &jetstream::Message, kind: AckKind) {
    let what = format!("{kind:?}");
    // A nak may as well be lost: the message comes back after ack_wait either way.
    if !matches!(kind, AckKind::Ack | AckKind::Term) {
        if let Err(e) = msg.ack_with(kind).await {
            tracing::warn!(ack = what, error = %e, "cannot settle the message; it will be redelivered");
        }
        return;
    }
    // Acks and terms that end a job are confirmed by the server, and retried: a lost one sends the job round
    // again (a lost term after a requeue would even see the old message given up while its copy runs).
    for attempt in 1..=3u32 {
        match msg.double_ack_with(kind).await {
            Ok(()) => return,
            Err(e) if attempt < 3 => {
                tracing::warn!(ack = what, attempt, error = %e, "cannot settle the message; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(e) => tracing::warn!(ack = what, error = %e, "cannot settle the message; it will be redelivered"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
