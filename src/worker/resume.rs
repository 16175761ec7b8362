//! Checkpoints of running jobs: a job that a delivery does not finish (the worker crashed, was preempted
//! or shut down) continues from its last checkpoint on the next delivery, on any worker with the model,
//! instead of from step 0. A checkpoint is one object (`checkpoints/<job_id>.safetensors`), written every
//! `--checkpoint-every` steps or `--checkpoint-interval`, read only by a redelivery, and deleted when the
//! job ends. It belongs to the exact job message, model (its name and source), LoRAs and dtype that made it (a fingerprint in it says
//! which); any other is ignored. On the same device class the resumed job's images equal an uninterrupted
//! run's bytes; on another, they are as close as two device classes' runs ever are.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Shared;
use crate::diffusion::ResumeState;
use crate::protocol::{self, JobRequest};

/// The checkpoint layout; a checkpoint of another (an older worker's, in a rolling upgrade) is ignored.
const FORMAT: &str = "sd-rbee-resume-1";

/// What a checkpoint must carry to be taken up by `job` on `model` (loaded as `source`, its
/// [weights stamp](crate::generation::LoadedModel::weights_stamp): a worker that serves the name from other
/// weights must start over) in `dtype` with `numerics` (the [device's](crate::diffusion::numerics): a job
/// begun with other kernels is not finished with these, so its images are one worker's numbers, as the
/// result cache keeps them), with `loras` (a LoRA object replaced in the store between deliveries is
/// another LoRA).
pub(super) fn fingerprint(
    job: &JobRequest,
    model: &str,
    source: &str,
    loras: &[crate::diffusion::LoraWeight],
    (dtype, numerics): (candle_core::DType, &str),
) -> String {
    let message = serde_json::to_vec(job).unwrap_or_default();
    let mut digest = Sha256::new()
        .chain_update(FORMAT)
        .chain_update(&message)
        .chain_update(model)
        .chain_update(b"\0")
        .chain_update(source)
        .chain_update(format!("{dtype:?}\0{numerics}"));
    for lora in loras {
        digest.update(lora.lora.hash);
        digest.update(lora.scale.to_le_bytes());
    }
    hex::encode(digest.finalize())
}

/// The largest checkpoint a job within `limits` leaves: its latents (4 channels, one value per 8 × 8
/// pixels) and up to five more of their size (a scheduler's history), at 8 bytes a value, and room for the
/// header; about 117 MiB with the default limits. Anything past that is no checkpoint of ours.
fn max_checkpoint_bytes(limits: &protocol::Limits) -> u64 {
    let values = u64::from(limits.max_images).saturating_mul(4).saturating_mul(limits.max_pixels / 64);
    values.saturating_mul(8 * 6).saturating_add(16 << 20)
}

/// The checkpoint an earlier delivery of `job` left, if there is one. Looked for on every delivery (a miss
/// is one cheap read): a job requeued at a shutdown is a new message whose delivery count starts again.
/// Bounded: with the store unreachable (it retries for `--store-retry`), starting over beats waiting.
pub(super) async fn fetch(shared: &Shared, job: &JobRequest) -> Option<Bytes> {
    let key = protocol::resume_key(job.id);
    match tokio::time::timeout(
        STORE_PATIENCE,
        shared.store.get_at_most(&key, max_checkpoint_bytes(&shared.config.limits)),
    )
    .await
    {
        Ok(Ok(bytes)) => Some(bytes),
        Ok(Err(e)) if e.is_missing() => None,
        Ok(Err(e)) => {
            tracing::warn!(job_id = %job.id, error = %e, "cannot read the job's checkpoint; starting from the beginning");
            None
        }
        Err(_) => {
            tracing::warn!(job_id = %job.id, "the store is slow to answer; starting from the beginning");
            None
        }
    }
}

/// `bytes` as a checkpoint of the job `fingerprint` names, with its tensors on `device`.
pub(super) fn read(bytes: &[u8], fingerprint: &str, device: &candle_core::Device) -> anyhow::Result<ResumeState> {
    let state = ResumeState::from_bytes(bytes, device)?;
    anyhow::ensure!(state.label == fingerprint, "it was made for another job message, model or dtype");
    Ok(state)
}

/// How long reading or storing a checkpoint may hold up the job (the store may be retrying an outage).
const STORE_PATIENCE: Duration = Duration::from_secs(5);

pub(super) async fn save(shared: &Shared, job_id: Uuid, bytes: Vec<u8>) {
    let key = protocol::resume_key(job_id);
    let put = shared.store.put(&key, Bytes::from(bytes), "application/octet-stream");
    match tokio::time::timeout(STORE_PATIENCE, put).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(%job_id, error = %e, "cannot store a checkpoint; the job goes on"),
        Err(_) => tracing::warn!(%job_id, "the store is slow; the job goes on without this checkpoint"),
    }
}

/// Deletes the job's checkpoint: it ended (or the checkpoint cannot be taken up). Waits [`STORE_PATIENCE`] at
/// most, so a store retrying an outage does not hold up the job's report; the delete goes on meanwhile.
pub(super) async fn discard(shared: &Shared, job_id: Uuid) {
    let (store, key) = (shared.store.clone(), protocol::resume_key(job_id));
    let delete = tokio::spawn(async move { store.delete(&key).await });
    match tokio::time::timeout(STORE_PATIENCE, delete).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(%job_id, error = %e, "cannot delete the job's checkpoint"),
        Ok(Err(e)) => tracing::warn!(%job_id, error = %e, "the checkpoint's delete stopped"),
        Err(_) => tracing::warn!(%job_id, "the store is slow: the job's checkpoint is deleted in the background"),
    }
}

/// When a running job's next checkpoint is due: every `every` steps, or `interval` after the last.
pub(super) struct Schedule {
    every: u32,
    interval: Duration,
    last: Instant,
}

impl Schedule {
    pub(super) fn new(every: u32, interval: Duration) -> Self {
        Self { every, interval, last: Instant::now() }
    }

    /// Whether to checkpoint after `step` of `total` (never after the last: the job is about to end).
    pub(super) fn due(&mut self, step: usize, total: usize) -> bool {
        let by_steps = self.every > 0 && step.is_multiple_of(self.every as usize);
        let by_time = !self.interval.is_zero() && self.last.elapsed() >= self.interval;
        let due = step < total && (by_steps || by_time);
        if due {
            self.last = Instant::now();
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_come_every_n_steps_and_never_after_the_last() {
        let mut s = Schedule::new(4, Duration::ZERO);
        let due: Vec<usize> = (1..=12).filter(|&k| s.due(k, 12)).collect();
        assert_eq!(due, [4, 8]);
        let mut off = Schedule::new(0, Duration::ZERO);
        assert!((1..=12).all(|k| !off.due(k, 12)));
        let mut timed = Schedule::new(0, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(3));
        assert!(timed.due(1, 12) && !timed.due(2, 12), "due after the interval, then not until the next");
    }

    #[test]
    fn the_fingerprint_changes_with_the_job_the_model_its_source_the_loras_and_the_dtype() {
        use crate::diffusion::{lora::Lora, LoraWeight};
        let job = JobRequest::new(protocol::JobKind::Txt2Img, "tiny", "a cat");
        let f32 = candle_core::DType::F32;
        let base = fingerprint(&job, "tiny", "models/tiny", &[], (f32, ""));
        let mut other = job.clone();
        other.seed = Some(5);
        assert_ne!(base, fingerprint(&other, "tiny", "models/tiny", &[], (f32, "")));
        assert_ne!(base, fingerprint(&job, "tiny2", "models/tiny", &[], (f32, "")));
        assert_ne!(base, fingerprint(&job, "tiny", "models/tiny-v2", &[], (f32, "")));
        assert_ne!(base, fingerprint(&job, "tiny", "models/tiny", &[], (candle_core::DType::F16, "")));
        assert_ne!(base, fingerprint(&job, "tiny", "models/tiny", &[], (f32, "r2 cpu: winograd false")));
        assert_eq!(base, fingerprint(&job.clone(), "tiny", "models/tiny", &[], (f32, "")));
        // The same LoRA name with other contents (an object replaced in the store), or at another scale.
        let lora = |file: &str, scale: f64| {
            let path = std::path::Path::new("tests/fixtures/tiny-sd15/lora").join(file);
            let lora = Lora::from_bytes("style", &std::fs::read(path).unwrap()).unwrap();
            LoraWeight { lora: std::sync::Arc::new(lora), scale }
        };
        let style = fingerprint(&job, "tiny", "models/tiny", &[lora("style.safetensors", 1.0)], (f32, ""));
        assert_ne!(base, style);
        assert_ne!(style, fingerprint(&job, "tiny", "models/tiny", &[lora("detail.safetensors", 1.0)], (f32, "")));
        assert_ne!(style, fingerprint(&job, "tiny", "models/tiny", &[lora("style.safetensors", 0.5)], (f32, "")));
        assert_eq!(style, fingerprint(&job, "tiny", "models/tiny", &[lora("style.safetensors", 1.0)], (f32, "")));
    }
}
