//! Generating one job and storing its images: its inputs read and checked, its model checked out of the
//! catalogue, generation in a batch with the jobs it can share UNet passes with (`batcher.rs`) with
//! progress forwarded as events, stopped at the deadline, then every image and the manifest uploaded. What
//! can go wrong is a [`Failure`], which the policy maps to what happens to the message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use super::batcher::Ticket;
use super::control::{StopHandle, StopReason};
use super::effects::publish_event;
use super::policy::{Delivery, Outcome};
use super::Shared;
use crate::diffusion::{GenerateError, GenerationOutput, LoraWeight, StepInfo};
use crate::generation::{self, LoadedModel, Params};
use crate::protocol::{
    self, manifest_key, now_millis, Completed, ErrorCode, Event, ImageResult, ImageSource, JobRequest, Progress,
    ProtocolError, Timings, PROTOCOL_VERSION,
};

/// Why a delivery did not complete.
pub(super) enum Failure {
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

    /// The outcome of `job`'s delivery that failed so.
    pub(super) fn into_outcome(self, job: &JobRequest) -> Outcome {
        let job_id = job.id;
        match self {
            Failure::Invalid(error) => Outcome::Invalid { job_id: Some(job_id), error },
            Failure::Stopped { reason: StopReason::Cancelled, at_step } => Outcome::Cancelled { job_id, at_step },
            Failure::Stopped { reason: StopReason::Timeout, at_step } => {
                // The timer was the sooner of the two.
                let deadline = job.stop_at().is_some_and(|d| d <= now_millis() + 1000);
                Outcome::TimedOut { job_id, at_step, deadline }
            }
            Failure::Stopped { reason: StopReason::Shutdown, at_step } => Outcome::Shutdown { job_id, at_step },
            // Retried (after the backoff, by any worker) like a transient failure, and failed only when no
            // delivery could start it: handed back without end, a job that never gets a turn would never end.
            Failure::Stopped { reason: StopReason::Unstarted, .. } => Outcome::Transient {
                job_id,
                code: ErrorCode::Timeout,
                message: "the job waited the worker's whole time limit without starting".into(),
            },
            Failure::Transient { code, message } => Outcome::Transient { job_id, code, message },
        }
    }
}

/// One progress update from the generation thread.
struct Step {
    step: u32,
    total: u32,
    /// The step a checkpoint took the job up from (0: none).
    resumed_from: u32,
    elapsed: Duration,
    preview: Option<Vec<u8>>,
    /// A checkpoint to store.
    checkpoint: Option<Vec<u8>>,
}

/// What a job takes from outside its message, got once, for its result cache key and its run alike: its
/// input pictures as encoded bytes (read twice, an object replaced in between would cache one picture's
/// images under the other's digest) and its LoRAs.
pub(super) struct JobInputs {
    pub init_image: Option<Bytes>,
    pub mask: Option<Bytes>,
    /// Reported after the pictures are decoded, as a LoRA failure always was.
    pub loras: Result<Vec<LoraWeight>, Failure>,
}

/// Gets the job's inputs: its pictures, then its LoRAs. Nothing for a job the run refuses before them (a
/// model this worker does not serve, a field of its own). A failure is the run's to report, in that order.
pub(super) async fn gather_inputs(shared: &Arc<Shared>, model: &str, job: &JobRequest) -> Result<JobInputs, Failure> {
    let mut inputs = JobInputs { init_image: None, mask: None, loras: Ok(Vec::new()) };
    if !shared.catalogue.contains(model) || Params::try_from(job).is_err() {
        return Ok(inputs);
    }
    if let Some(src) = &job.init_image {
        inputs.init_image = Some(read_picture(shared, src, "init_image").await?);
    }
    if let Some(src) = &job.mask {
        inputs.mask = Some(read_picture(shared, src, "mask").await?);
    }
    inputs.loras = resolve_loras(shared, job).await;
    Ok(inputs)
}

/// A picture of the job, encoded: inline bytes, or an object in the store.
async fn read_picture(shared: &Shared, source: &ImageSource, field: &str) -> Result<Bytes, Failure> {
    match source {
        ImageSource::Inline(b) => Ok(Bytes::copy_from_slice(b)),
        ImageSource::ObjectKey(key) => {
            use crate::storage::StoreError;
            match shared.store.get_at_most(key, crate::image_input::MAX_ENCODED_BYTES as u64).await {
                Ok(b) => Ok(b),
                Err(
                    e @ (StoreError::NotFound { .. }
                    | StoreError::InvalidKey { .. }
                    | StoreError::TooLarge { .. }
                    | StoreError::Denied { .. }),
                ) => Err(Failure::invalid(field, e)),
                Err(e) => Err(Failure::transient(ErrorCode::Storage, e)),
            }
        }
    }
}

/// Decodes a picture the job gave as `field`.
async fn decode_picture(bytes: Bytes, field: &str) -> Result<image::DynamicImage, Failure> {
    crate::image_input::decode_bounded(bytes, field).await.map_err(|e| match e.is::<crate::image_input::DecodeBusy>() {
        true => Failure::transient(ErrorCode::Internal, e),
        false => Failure::invalid(field, format!("{e:#}")),
    })
}

/// An encoded result image.
struct Encoded {
    bytes: Vec<u8>,
    seed: u64,
    width: u32,
    height: u32,
}

/// A job's LoRAs.
async fn resolve_loras(shared: &Arc<Shared>, job: &JobRequest) -> Result<Vec<LoraWeight>, Failure> {
    if job.loras.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<(String, f64)> = job.loras.iter().map(|l| (l.name.clone(), l.scale)).collect();
    shared.loras.resolve(&wanted).await.map_err(|e| match e.error {
        crate::loras::LoraSourceError::Unavailable(m) => Failure::transient(ErrorCode::Storage, m),
        crate::loras::LoraSourceError::NotReadNow(m) => Failure::transient(ErrorCode::Internal, m),
        error => Failure::invalid(&e.field, error),
    })
}

pub(super) async fn generate_and_store(
    shared: &Arc<Shared>,
    model: &str,
    job: &JobRequest,
    inputs: Result<JobInputs, Failure>,
    stop: &StopHandle,
    delivered: Delivery,
    received_at: u64,
) -> Result<Completed, Failure> {
    if !shared.catalogue.contains(model) {
        return Err(Failure::invalid("model", format!("{model:?} is not served by worker {}", shared.worker_id)));
    }
    let mut params = Params::try_from(job).map_err(Failure::Invalid)?;
    // A job cancelled, out of time or handed back at a shutdown while its inputs are read, its LoRAs fetched
    // or its model loaded goes no further than the step it is in (none of them can be interrupted).
    let stopped = || stop.reason().map_or(Ok(()), |reason| Err(Failure::Stopped { reason, at_step: None }));
    let JobInputs { init_image, mask, loras } = inputs?;
    if let Some(bytes) = init_image {
        let picture = decode_picture(bytes, "init_image").await?;
        // A job without a size takes its init image's: checked against the limits now, before a model is
        // loaded (or another evicted) and before the image is converted at that size.
        if job.width.is_none() || job.height.is_none() {
            let (w, h) = crate::image_input::default_size(&picture).map_err(|e| Failure::invalid("init_image", e))?;
            shared.config.limits.check_size(job.width.or(Some(w)), job.height.or(Some(h))).map_err(|e| {
                Failure::invalid(
                    "init_image",
                    format!("is {w}×{h}, the size of a job that gives none, which breaks the limits ({})", e.message),
                )
            })?;
        }
        params.init_image = Some(picture);
    }
    if let Some(bytes) = mask {
        params.mask = Some(decode_picture(bytes, "mask").await?);
    }
    if job.kind == protocol::JobKind::Txt2Img {
        params.strength = None;
    }
    params.loras = loras?;
    stopped()?;
    // The job is checked and its inputs read before its model is loaded: an invalid job evicts nothing.
    if !shared.catalogue.is_resident(model) {
        let mut loading = Progress::new(job.id, 0, job.steps.unwrap_or(0), now_millis());
        loading.phase = Some(protocol::JobPhase::Loading);
        publish_event(shared, &Event::Progress(loading), delivered).await;
    }
    let checkout = shared.catalogue.checkout(model).await.map_err(|e| {
        let text = format!("cannot load the model: {e:#}");
        // Its memory is the device's (other models in use), not the model's.
        let oom = text.to_ascii_lowercase().contains("out of memory");
        Failure::transient(if oom { ErrorCode::OutOfMemory } else { ErrorCode::ModelUnavailable }, text)
    })?;
    stopped()?;
    let loaded: Arc<LoadedModel> = checkout.model;
    let load_ms = checkout.load_ms.unwrap_or(0.0) as u64;
    let numerics = (loaded.pipeline.dtype(), crate::diffusion::numerics::signature(shared.config.device.class()));
    let fingerprint =
        super::resume::fingerprint(job, model, &loaded.weights_stamp, &params.loras, (numerics.0, &numerics.1));
    let resume_from = super::resume::fetch(shared, job).await;

    // The job's request is prepared on a blocking thread, then generated in a batch with the jobs it can
    // share UNet passes with (batcher.rs); progress comes back through a channel.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Step>();
    let preview_every = shared.config.preview_every;
    let limits = shared.config.limits.clone();
    let started = Instant::now();
    let prep_loaded = loaded.clone();
    let prep_fingerprint = fingerprint.clone();
    let job_id = job.id;
    let prepared = tokio::task::spawn_blocking(move || -> Result<_, GenerateError> {
        let sd = &prep_loaded.pipeline;
        let mut prepared = generation::prepare(sd, prep_loaded.entry, params)?;
        // A job without a size takes the model's, which the limits must allow too.
        let (w, h) = (prepared.request.width as u32, prepared.request.height as u32);
        limits.check_size(Some(w), Some(h)).map_err(|e| GenerateError::InvalidRequest {
            field: if e.field.as_deref() == Some("height") { "height" } else { "width" },
            message: format!(
                "of the size the job took by default, {w}×{h}, breaks this worker's limits ({}); give a smaller width and height",
                e.message
            ),
        })?;
        if let Some(bytes) = resume_from {
            match take_up(sd, &prepared.request, &bytes, &prep_fingerprint) {
                Ok(request) => prepared.request = request,
                Err(e) => tracing::warn!(%job_id, error = %format!("{e:#}"), "not resuming from the job's checkpoint"),
            }
        }
        let key = sd.batch_key(&prepared.request)?;
        Ok((prepared, key))
    })
    .await
    .map_err(|join| Failure::transient(ErrorCode::Internal, format!("preparing the job failed: {join}")))?;
    let (prepared, key) = prepared.map_err(|e| match e {
        GenerateError::InvalidRequest { field, message } => Failure::invalid(field, message),
        e => Failure::transient(ErrorCode::Internal, format!("{e:#}")),
    })?;
    if let Some(state) = &prepared.request.resume {
        tracing::info!(job_id = %job.id, step = state.step, "resuming from the job's checkpoint");
    }
    let resumed_steps = prepared.request.resume.as_ref().map_or(0, |s| s.step as u32);
    let mut schedule = super::resume::Schedule::new(shared.config.checkpoint_every, shared.config.checkpoint_interval);
    let on_step = move |info: &StepInfo| {
        let preview = (preview_every > 0
            && ((info.step as u32).is_multiple_of(preview_every) || info.step == info.total))
            .then(|| {
                info.preview(0).ok().and_then(|p| generation::encode_image(&p, protocol::ImageFormat::Jpeg, 70).ok())
            })
            .flatten();
        let checkpoint = schedule.due(info.step, info.total).then(|| {
            let bytes = info.checkpoint().and_then(|mut state| {
                state.label = fingerprint.clone();
                state.to_bytes()
            });
            bytes.inspect_err(|e| tracing::warn!(error = %format!("{e:#}"), "cannot make a checkpoint")).ok()
        });
        let _ = tx.send(Step {
            step: info.step as u32,
            total: info.total as u32,
            resumed_from: info.resumed_from as u32,
            elapsed: info.elapsed,
            preview,
            checkpoint: checkpoint.flatten(),
        });
    };
    let (done, result) = tokio::sync::oneshot::channel();
    let (started_tx, mut batch_started) = tokio::sync::mpsc::unbounded_channel();
    shared.batcher.submit(Ticket {
        model: loaded.clone(),
        request: prepared.request.clone(),
        key,
        cancel: stop.flag().clone(),
        on_step: Box::new(on_step),
        done,
        started: Some(started_tx),
        priority: job.priority,
    });

    // Forward progress while it runs; stop it at the deadline or the worker's time limit. That limit is on
    // running: it counts from when the job's batch starts, not while it waits behind other batches here (a
    // worker holds several jobs to fill its batches). A job that waits that long without starting is handed
    // back to be tried again, by any worker, after the retry backoff: it never ran, so it has not failed yet.
    let own = shared.config.job_timeout;
    let limit = || job.stop_at().map_or(own, |d| Duration::from_millis(d.saturating_sub(now_millis())).min(own));
    let timer = tokio::time::sleep(limit());
    tokio::pin!(timer);
    tokio::pin!(result);
    let (mut running, mut closed) = (false, false);
    // The watchdog's look, once a second while the batch runs (made once: the loop turns every step).
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    // (Not a burst of the ticks missed while the job waited for its batch.)
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat = None;
    let mut last_step = None;
    let result = loop {
        tokio::select! {
            biased;
            Some(mut step) = rx.recv() => {
                last_step = Some(step.step);
                // Stored before the step is reported: a worker seen at step N has its checkpoint of step N.
                if let Some(bytes) = step.checkpoint.take() {
                    super::resume::save(shared, job.id, bytes).await;
                }
                publish_progress(shared, job.id, &step, delivered).await;
            }
            res = &mut result => break res,
            // Its batch started (or, after the batch failed, its run alone): the time limit counts from now.
            begun = batch_started.recv(), if !closed => {
                running = true;
                stop.started_generating();
                match begun {
                    Some(begun) => {
                        beat = Some(begun);
                        timer.as_mut().reset(tokio::time::Instant::now() + limit());
                        watch.reset();
                    }
                    // The ticket went without a run (the worker stopping): its result says so.
                    None => closed = true,
                }
            }
            _ = &mut timer, if stop.reason().is_none() => {
                // (a few ms of slack: the timer was set in whole milliseconds)
                let past_deadline = job.stop_at().is_some_and(|d| now_millis() + 10 >= d);
                if running || past_deadline {
                    stop.stop(StopReason::Timeout);
                } else {
                    tracing::warn!(job_id = %job.id, waited = ?own, "the job did not start here within the time limit");
                    stop.stop(StopReason::Unstarted);
                }
            }
            // Told to stop, its batch has not finished a step, VAE call or tile for far longer than its
            // slowest: the call hangs, and the job would never end. Report it; the worker drains and exits to be restarted.
            // (It looks every second while the batch runs: a cancel from elsewhere does not wake this loop.)
            _ = watch.tick(), if beat.is_some() => {
                let batch: &super::batcher::BatchBeat = beat.as_deref().expect("checked");
                let stopped = stop.stopped_at();
                if stopped.is_some_and(|at| batch.hung(at, shared.config.stall_timeout)) {
                    let reason = stop.reason().expect("checked");
                    tracing::error!(job_id = %job.id, silent = ?batch.silent_for(), longest_gap = ?batch.longest_gap(),
                        "a generation step or VAE call has not returned since the job was told to stop: the device is taken for hung, the worker stops");
                    shared.stalled.cancel();
                    return Err(Failure::Stopped { reason, at_step: last_step });
                }
            }
        }
    };
    while let Ok(step) = rx.try_recv() {
        // The result is in: the checkpoints still queued are of no use any more.
        last_step = Some(step.step);
        publish_progress(shared, job.id, &step, delivered).await;
    }
    let generation_ms = started.elapsed().as_millis() as u64;
    let output = match result {
        Ok(Ok(output)) => output,
        Ok(Err(GenerateError::Cancelled { completed, .. })) => {
            let reason = stop.reason().unwrap_or(StopReason::Cancelled);
            return Err(Failure::Stopped { reason, at_step: Some(completed as u32) });
        }
        Ok(Err(GenerateError::InvalidRequest { field: "resume", message })) => {
            // The job is fine; its checkpoint is not (a worker of another version wrote it): drop it and
            // let the next delivery start over.
            super::resume::discard(shared, job.id).await;
            return Err(Failure::transient(
                ErrorCode::Internal,
                format!("cannot continue from the checkpoint: {message}"),
            ));
        }
        Ok(Err(GenerateError::InvalidRequest { field, message })) => return Err(Failure::invalid(field, message)),
        Ok(Err(GenerateError::NonFinite { stage })) => {
            // The checkpoints this run left may hold the values that blew up.
            super::resume::discard(shared, job.id).await;
            if resumed_steps > 0 {
                // It may be the checkpoint's doing: the next delivery starts over.
                let message = format!("the {stage} gave NaN or infinite values after continuing from a checkpoint");
                return Err(Failure::transient(ErrorCode::Internal, message));
            }
            // Its model, dtype and device class are what blow up, and they are the same at every delivery:
            // retried, the job would only run again as often as deliveries allow (for ever without a limit).
            // It fails now, dead-lettered.
            let dtype = format!("{:?}", shared.config.dtype).to_lowercase();
            if !job.loras.is_empty() {
                // Most likely its LoRAs' doing (a scale too large for the weights): the job's to change.
                let named: Vec<String> = job.loras.iter().map(|l| format!("{} × {}", l.name, l.scale)).collect();
                let message = format!(
                    "({}) made the model produce NaN or infinite values in the {stage}, running in {dtype}: try smaller scales",
                    named.join(", ")
                );
                return Err(Failure::invalid("loras", message));
            }
            let message = format!(
                "the model produced NaN or infinite values in the {stage}, running in {dtype} on this worker's device: it would do so at every delivery to such a worker"
            );
            return Err(Failure::Invalid(ProtocolError { code: ErrorCode::Internal, field: None, message }));
        }
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            let code = if text.to_ascii_lowercase().contains("out of memory") {
                ErrorCode::OutOfMemory
            } else {
                ErrorCode::Internal
            };
            if resumed_steps > 0 && code == ErrorCode::Internal {
                // It may be the checkpoint's doing: the next delivery starts over rather than fail the same
                // way on every one (an out-of-memory is the device's, and keeps it).
                super::resume::discard(shared, job.id).await;
            }
            return Err(Failure::Transient { code, message: text });
        }
        Err(_) if resumed_steps > 0 => {
            // It may be the checkpoint's doing (a corrupt counter indexing past a table): the next delivery
            // starts over rather than fail the same way on every one.
            super::resume::discard(shared, job.id).await;
            return Err(Failure::transient(
                ErrorCode::Internal,
                "the generation thread failed while continuing from the job's checkpoint, which is dropped",
            ));
        }
        Err(_) => return Err(Failure::transient(ErrorCode::Internal, "the generation thread failed")),
    };
    let format = job.output.format;
    let quality = job.output.quality.unwrap_or(generation::DEFAULT_QUALITY);
    let (encoded, lora_ms, warnings) = tokio::task::spawn_blocking(move || encode(&prepared, &output, format, quality))
        .await
        .map_err(|join| Failure::transient(ErrorCode::Internal, format!("encoding the images failed: {join}")))?
        .map_err(|e| Failure::transient(ErrorCode::Internal, format!("{e:#}")))?;
    let run_here = last_step.map(|n| n.saturating_sub(resumed_steps)).filter(|&n| n > 0);
    let step_ms = run_here.map(|n| generation_ms as f64 / f64::from(n));

    // A job that expired meanwhile stores nothing: the queens' sweeper may already have swept it. Nor does
    // one stopped since its last step (cancelled while its images were decoded or encoded).
    if job.expires_at.is_some_and(|e| now_millis() >= e) {
        return Err(Failure::Stopped { reason: StopReason::Timeout, at_step: last_step });
    }
    if let Some(reason) = stop.reason() {
        return Err(Failure::Stopped { reason, at_step: last_step });
    }
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
        let url = shared.store.presigned_get(&key, job.expires_at).await;
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
        warnings: warnings
            .iter()
            .take(protocol::MAX_WARNINGS)
            .map(|w| protocol::truncate(w, protocol::MAX_WARNING_BYTES).to_string())
            .collect(),
        cached: false,
    };
    // The manifest marks the job done: not for one cancelled or out of time while its images were uploaded,
    // whose images go again (nothing else would delete them). One whose shutdown grace ended meanwhile is
    // done all the same: handed back, it would be generated again.
    if let Some(reason @ (StopReason::Cancelled | StopReason::Timeout)) = stop.reason() {
        for image in &completed.images {
            if let Err(e) = shared.store.delete(&image.key).await {
                tracing::warn!(job_id = %job.id, key = image.key, error = %e, "cannot delete an image of a stopped job");
            }
        }
        return Err(Failure::Stopped { reason, at_step: last_step });
    }
    super::effects::store_completed(shared, &manifest_key(job.id), &completed)
        .await
        .map_err(|e| Failure::transient(ErrorCode::Storage, e))?;
    tracing::info!(job_id = %job.id, generation_ms, upload_ms, generation_ms_per_step = step_ms.unwrap_or(0.0), "job completed");
    Ok(completed)
}

/// `request` continuing from the checkpoint `bytes`, if it is one of this job (`fingerprint`) that the
/// pipeline can take up; the job's seed is the checkpoint's (an unseeded job drew it on the first delivery).
fn take_up(
    sd: &crate::diffusion::StableDiffusion,
    request: &crate::diffusion::GenerationRequest,
    bytes: &[u8],
    fingerprint: &str,
) -> anyhow::Result<crate::diffusion::GenerationRequest> {
    let state = super::resume::read(bytes, fingerprint, sd.device())?;
    let mut resumed = request.clone();
    resumed.seed = state.seeds.first().copied();
    resumed.resume = Some(Arc::new(state));
    sd.batch_key(&resumed)?;
    Ok(resumed)
}

/// The job's final images (pasted back, for inpainting) encoded, with the LoRA time and every warning.
fn encode(
    prepared: &generation::Prepared,
    output: &GenerationOutput,
    format: protocol::ImageFormat,
    quality: u8,
) -> anyhow::Result<(Vec<Encoded>, f64, Vec<String>)> {
    let warnings: Vec<String> = prepared.warnings.iter().chain(&output.warnings).map(ToString::to_string).collect();
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let finals = prepared.finish(output)?;
    let encoded = finals
        .iter()
        .zip(&output.images)
        .map(|(pixels, img)| {
            let (_, h, w) = pixels.dims3()?;
            let bytes = generation::encode_tensor(pixels, format, quality)?;
            Ok(Encoded { bytes, seed: img.seed, width: w as u32, height: h as u32 })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((encoded, output.timings.lora_ms, warnings))
}

async fn publish_progress(shared: &Shared, job_id: Uuid, step: &Step, delivered: Delivery) {
    let mut progress = Progress::new(job_id, step.step, step.total, now_millis());
    let run_here = step.step.saturating_sub(step.resumed_from);
    if run_here > 0 {
        let per_step = step.elapsed / run_here;
        progress.eta_ms = Some((per_step * step.total.saturating_sub(step.step)).as_millis() as u64);
    }
    progress.resumed_from_step = (step.resumed_from > 0).then_some(step.resumed_from);
    progress.preview_jpeg = step.preview.clone();
    publish_event(shared, &Event::Progress(progress), delivered).await;
}
