//! What a worker is configured with: [`WorkerConfig`] and the models it serves ([`ModelSpec`], parsed from
//! `--model NAME=PATH_OR_REPO[,config=DIR][,vae=PATH][,prediction_type=P]`).

use std::time::Duration;

use crate::bus::{ConsumerSettings, StreamSettings};
use crate::device::DeviceSpec;
use crate::loras::LoraLimits;
use crate::protocol::{self, Limits};
use crate::storage::StoreOptions;

/// A model the worker serves: the short name jobs use (a subject token), where it comes from, and for
/// single-file checkpoints how to read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub source: String,
    /// A single file's diffusers config folder (`,config=DIR`).
    pub config: Option<std::path::PathBuf>,
    /// A VAE to use instead of the model's (`,vae=PATH`).
    pub vae: Option<std::path::PathBuf>,
    /// `epsilon`, `v_prediction` or `sample` (`,prediction_type=...`).
    pub prediction_type: Option<String>,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    /// `NAME=PATH_OR_REPO[,config=DIR][,vae=PATH][,prediction_type=P]`, or a short name alone (`v1-5`)
    /// that is both.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = match s.split_once('=') {
            Some((n, src)) => (n.trim(), src.trim()),
            None => (s.trim(), s.trim()),
        };
        let mut parts = rest.split(',');
        let source = parts.next().unwrap_or("").trim();
        if source.is_empty() {
            return Err(format!("{s:?}: expected NAME=PATH_OR_REPO"));
        }
        protocol::validate_model_name(name).map_err(|e| {
            format!("{s:?}: the model name {} (use NAME=PATH_OR_REPO to name a folder or repo)", e.message)
        })?;
        let mut spec = ModelSpec { name: name.to_string(), source: source.to_string(), ..Default::default() };
        for option in parts {
            match option.trim().split_once('=') {
                Some(("config", dir)) => spec.config = Some(dir.into()),
                Some(("vae", path)) => spec.vae = Some(path.into()),
                Some(("prediction_type", p)) if ["epsilon", "v_prediction", "sample"].contains(&p) => {
                    spec.prediction_type = Some(p.to_string())
                }
                _ => {
                    return Err(format!(
                        "{s:?}: {option:?} is not an option (config=DIR, vae=PATH, prediction_type=epsilon|v_prediction|sample)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

/// Everything a worker is configured with.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub nats_url: String,
    pub store_url: String,
    pub models: Vec<ModelSpec>,
    pub device: DeviceSpec,
    pub dtype: candle_core::DType,
    pub offline: bool,
    /// `None`: `<hostname>-<random>`.
    pub worker_id: Option<String>,
    pub prefix: String,
    /// Batches run at the same time (one per device is right for GPUs).
    pub concurrency: usize,
    /// The most images one batch generates; `None`: 1 on the CPU, up to 8 on GPUs (by image size).
    pub max_batch: Option<usize>,
    /// How long a job waits for others to share its batch.
    pub batch_window: Duration,
    /// One pick in this many starts from the lowest priority with jobs waiting, so that low priorities keep
    /// moving under a stream of high ones; 0: strict priority.
    pub priority_share: u32,
    pub consumer: ConsumerSettings,
    pub streams: StreamSettings,
    /// Nak delays for transient failures, by delivery (the last one repeats).
    pub retry_backoff: Vec<Duration>,
    /// Longest a job may run when it has no earlier deadline, from when its batch starts (one that waits this
    /// long without starting is retried, like a transient failure).
    pub job_timeout: Duration,
    /// How long running jobs may finish after a shutdown signal.
    pub grace: Duration,
    /// How long a running batch may go without finishing a step, a VAE call or a decoded tile, once one of
    /// its jobs was told to stop (and at least three times its longest such wait, counting the one it was in
    /// when told), before the worker takes its device for hung: the job is reported as stopped, and the worker
    /// drains and exits with an error so that it is restarted.
    pub stall_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// A preview JPEG every N steps (and at the last); 0: none.
    pub preview_every: u32,
    /// A checkpoint (latents, scheduler and noise state) in the object store every N steps, from which
    /// another delivery of the job continues; 0: not by steps.
    pub checkpoint_every: u32,
    /// A checkpoint when this long has passed since the last (or the start); zero: not by time.
    pub checkpoint_interval: Duration,
    /// How long terminal events and dead letters are retried while NATS is away.
    pub publish_patience: Duration,
    pub store: StoreOptions,
    pub limits: Limits,
    /// A pause after every step: simulates a slow device (for tests and demos).
    pub step_delay: Duration,
    /// The LoRA catalogue: jobs name `NAME.safetensors` files in it.
    pub lora_dir: Option<std::path::PathBuf>,
    /// LoRAs in the object store too: `<prefix>/NAME.safetensors` (after `lora_dir`).
    pub lora_store_prefix: Option<String>,
    /// Whether `owner/name[/FILE]` LoRA names are fetched from the Hugging Face Hub.
    pub lora_hub: bool,
    /// Largest LoRA file, and how many bytes of parsed LoRAs stay cached (the count per job is
    /// `limits.max_loras`).
    pub lora_limits: LoraLimits,
    /// The memory the resident models may take; `None`: half the RAM on the CPU, no limit on GPUs.
    pub max_resident_bytes: Option<u64>,
}

impl WorkerConfig {
    pub fn new(nats_url: impl Into<String>, store_url: impl Into<String>, models: Vec<ModelSpec>) -> Self {
        Self {
            nats_url: nats_url.into(),
            store_url: store_url.into(),
            models,
            device: DeviceSpec::Cpu,
            dtype: candle_core::DType::F32,
            offline: false,
            worker_id: None,
            prefix: protocol::DEFAULT_PREFIX.to_string(),
            concurrency: 1,
            max_batch: None,
            batch_window: Duration::from_millis(50),
            priority_share: 10,
            consumer: ConsumerSettings::default(),
            streams: StreamSettings::default(),
            retry_backoff: vec![Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)],
            job_timeout: Duration::from_secs(15 * 60),
            grace: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10 * 60),
            heartbeat_interval: Duration::from_secs(protocol::HEARTBEAT_INTERVAL_SECS),
            preview_every: 5,
            checkpoint_every: 10,
            checkpoint_interval: Duration::from_secs(30),
            publish_patience: Duration::from_secs(60),
            store: StoreOptions::default(),
            limits: Limits::default(),
            step_delay: Duration::ZERO,
            lora_dir: None,
            lora_store_prefix: None,
            lora_hub: false,
            lora_limits: LoraLimits::default(),
            max_resident_bytes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs() {
        let m: ModelSpec = "tiny=tests/fixtures/tiny-sd15".parse().unwrap();
        assert_eq!(
            m,
            ModelSpec { name: "tiny".into(), source: "tests/fixtures/tiny-sd15".into(), ..Default::default() }
        );
        let m: ModelSpec =
            "ft=model.safetensors,config=cfg,vae=v.safetensors,prediction_type=v_prediction".parse().unwrap();
        assert_eq!(
            (m.source.as_str(), m.config.unwrap(), m.vae.unwrap()),
            ("model.safetensors", "cfg".into(), "v.safetensors".into())
        );
        assert_eq!(m.prediction_type.as_deref(), Some("v_prediction"));
        let err = "ft=m.safetensors,colour=red".parse::<ModelSpec>().unwrap_err();
        assert!(err.contains("colour") && err.contains("config=DIR"), "{err}");
        let m: ModelSpec = "v1-5".parse().unwrap();
        assert_eq!(m.name, "v1-5");
        let err = "runwayml/stable-diffusion-v1-5".parse::<ModelSpec>().unwrap_err();
        assert!(err.contains("NAME=PATH_OR_REPO"), "{err}");
        let err = "a.b=x".parse::<ModelSpec>().unwrap_err();
        assert!(err.contains("'.'"), "{err}");
        assert!("x=".parse::<ModelSpec>().is_err());
    }
}
